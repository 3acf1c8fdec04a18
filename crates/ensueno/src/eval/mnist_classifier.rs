//! A small convolutional classifier for 28x28 grey images (MNIST, and with
//! weights of our own Fashion-MNIST), used to judge generated samples: the
//! accuracy of class-conditional samples and the penultimate features for a
//! classifier-based Fréchet distance.
//!
//! Architecture: three 3x3 convolutions (1->8->16->24, no padding) with ReLU,
//! batch norm, a 11616->32 linear layer with ReLU, a 32->10 linear layer,
//! batch norm and log-softmax. Batch normalisation: Ioffe & Szegedy, "Batch
//! Normalization: Accelerating Deep Network Training by Reducing Internal
//! Covariate Shift", 2015, arXiv:1502.03167.
//!
//! Reference implementation: the burn examples' MNIST model (tracel-ai/burn,
//! `examples/onnx-inference`, imported from a PyTorch model through ONNX);
//! `model.rs.reference` next to the shared weights shows its layer order.
//! The checkpoint uses PyTorch's names and layouts (`weight [out, in]`,
//! `running_mean`, `running_var`), which are also candle_nn's.
//!
//! # Input scaling
//!
//! The shared weights were trained on standardised pixels,
//! `(pixels / 255 - 0.1307) / 0.3081`: on `pixels / 255` alone they reach
//! only 58% test accuracy instead of 99.17%. The model therefore takes images
//! in `[0, 1]` and standardises them itself with [`MNIST_MEAN`] and
//! [`MNIST_STD`] (changeable with
//! [`MnistClassifier::with_input_standardization`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, Module, ModuleT, VarBuilder};

use crate::ops::conv::{Conv2d, Conv2dConfig};
use crate::{Error, Result};

/// Mean of the MNIST training pixels (in `[0, 1]`), subtracted from inputs.
pub const MNIST_MEAN: f64 = 0.1307;
/// Standard deviation of the MNIST training pixels, dividing inputs.
pub const MNIST_STD: f64 = 0.3081;

/// Side of the square input images.
pub const IMAGE_SIZE: usize = 28;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Width of [`MnistClassifier::features`].
pub const FEATURE_DIM: usize = 32;

const FLAT_DIM: usize = 24 * 22 * 22;
/// Images per forward pass in [`MnistClassifier::predict`] and
/// [`MnistClassifier::features_batched`]: bounds the 11616-wide activations.
const PREDICT_BATCH: usize = 500;

/// The classifier. Field names are the checkpoint's top-level keys; the
/// layers are public so a trainer can reach them (e.g. to set batch-norm
/// momentum or to freeze parts).
#[derive(Debug, Clone)]
pub struct MnistClassifier {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub conv3: Conv2d,
    pub norm1: BatchNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub norm2: BatchNorm,
    input_mean: f64,
    input_std: f64,
}

impl MnistClassifier {
    /// Builds the model from `vb`, whose keys are those of the shared
    /// checkpoint (`conv1.weight`, `norm1.running_mean`, `fc1.weight`...).
    /// With a `VarMap`-backed builder the model is freshly initialised and
    /// trainable; batch-norm running statistics then live in the `VarMap`
    /// too (updated by [`Self::forward_train`] in training mode, never by
    /// gradients), so saving the map saves a complete checkpoint.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let conv = |name: &str, cin: usize, cout: usize| {
            Conv2d::new(vb.pp(name), cin, cout, 3, Conv2dConfig::default())
        };
        // burn's and PyTorch's defaults: eps 1e-5, momentum 0.1, affine.
        let bn_config = BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        };
        Ok(Self {
            conv1: conv("conv1", 1, 8)?,
            conv2: conv("conv2", 8, 16)?,
            conv3: conv("conv3", 16, 24)?,
            norm1: candle_nn::batch_norm(24, bn_config, vb.pp("norm1"))?,
            fc1: candle_nn::linear(FLAT_DIM, FEATURE_DIM, vb.pp("fc1"))?,
            fc2: candle_nn::linear(FEATURE_DIM, NUM_CLASSES, vb.pp("fc2"))?,
            norm2: candle_nn::batch_norm(NUM_CLASSES, bn_config, vb.pp("norm2"))?,
            input_mean: MNIST_MEAN,
            input_std: MNIST_STD,
        })
    }

    /// Loads a safetensors checkpoint (e.g. the shared
    /// `mnist-classifier/mnist.safetensors`) in f32. A missing file, a missing
    /// key or a wrong shape gives [`Error::Model`] naming the file and the key.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let vb = crate::io::model_folder::var_builder_from_files(
            &[path.to_path_buf()],
            DType::F32,
            device,
        )?;
        Self::new(vb).map_err(|e| Error::Model {
            path: path.to_path_buf(),
            message: format!("not an MNIST classifier checkpoint: {e}"),
        })
    }

    /// Replaces the input standardisation `(x - mean) / std` (default
    /// [`MNIST_MEAN`], [`MNIST_STD`]); `(0.0, 1.0)` turns it off.
    pub fn with_input_standardization(mut self, mean: f64, std: f64) -> Result<Self> {
        if !(std.is_finite() && std > 0.0 && mean.is_finite()) {
            return Err(Error::invalid(format!(
                "classifier input standardisation needs a finite mean and a positive std, got mean {mean}, std {std}"
            )));
        }
        self.input_mean = mean;
        self.input_std = std;
        Ok(self)
    }

    /// The input standardisation `(mean, std)`.
    pub fn input_standardization(&self) -> (f64, f64) {
        (self.input_mean, self.input_std)
    }

    fn check_input(x: &Tensor) -> Result<()> {
        match x.dims() {
            [b, 1, IMAGE_SIZE, IMAGE_SIZE] if *b > 0 => Ok(()),
            _ => Err(Error::Shape {
                what: "classifier input".into(),
                expected: format!("(B >= 1, 1, {IMAGE_SIZE}, {IMAGE_SIZE})"),
                got: format!("{:?}", x.dims()),
            }),
        }
    }

    fn trunk(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Self::check_input(x)?;
        let x = x.to_dtype(self.conv1.weight.dtype())?;
        let x = ((x - self.input_mean)? / self.input_std)?;
        let x = self.conv1.forward(&x)?.relu()?;
        let x = self.conv2.forward(&x)?.relu()?;
        let x = self.conv3.forward(&x)?.relu()?;
        let x = self.norm1.forward_t(&x, train)?.flatten_from(1)?;
        Ok(self.fc1.forward(&x)?.relu()?)
    }

    fn head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        let logits = self.norm2.forward_t(&self.fc2.forward(features)?, train)?;
        let dtype = logits.dtype();
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        Ok(log_probs.to_dtype(dtype)?)
    }

    /// Log-probabilities of the ten classes (eval mode: batch norm with the
    /// running statistics).
    ///
    /// # Shapes
    /// `x (B, 1, 28, 28)` in `[0, 1]` -> `(B, 10)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_train(x, false)
    }

    /// [`Self::forward`] with the batch-norm mode chosen: with `train` true,
    /// batch norm normalises with the batch's statistics (B >= 2) and updates
    /// the running statistics (momentum 0.1), as PyTorch's training mode.
    ///
    /// # Shapes
    /// `x (B, 1, 28, 28)` in `[0, 1]` -> `(B, 10)`.
    pub fn forward_train(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && x.dim(0).unwrap_or(0) < 2 {
            return Err(Error::invalid(
                "batch norm in training mode needs a batch of at least 2 images",
            ));
        }
        let features = self.trunk(x, train)?;
        self.head(&features, train)
    }

    /// Penultimate features: the ReLU output of `fc1` (eval mode).
    ///
    /// # Shapes
    /// `x (B, 1, 28, 28)` in `[0, 1]` -> `(B, 32)`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.trunk(x, false)
    }

    /// [`Self::features`] of any number of images, computed
    /// [`PREDICT_BATCH`] at a time.
    ///
    /// # Shapes
    /// `x (B, 1, 28, 28)` in `[0, 1]` -> `(B, 32)`.
    pub fn features_batched(&self, x: &Tensor) -> Result<Tensor> {
        Self::check_input(x)?;
        let parts = chunks(x)?
            .iter()
            .map(|c| self.features(c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The most likely class of each image, computed [`PREDICT_BATCH`] images
    /// at a time.
    ///
    /// # Shapes
    /// `x (B, 1, 28, 28)` in `[0, 1]` -> `B` labels in `0..10`.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<u32>> {
        Self::check_input(x)?;
        let mut labels = Vec::with_capacity(x.dim(0)?);
        for chunk in chunks(x)? {
            let log_probs = self.forward(&chunk)?;
            labels.extend(log_probs.argmax(D::Minus1)?.to_vec1::<u32>()?);
        }
        Ok(labels)
    }
}

fn chunks(x: &Tensor) -> Result<Vec<Tensor>> {
    let n = x.dim(0)?;
    (0..n)
        .step_by(PREDICT_BATCH)
        .map(|start| Ok(x.narrow(0, start, PREDICT_BATCH.min(n - start))?))
        .collect()
}

/// The fraction of `predicted` labels equal to `expected`, in `[0, 1]`.
/// Labels missing from the shorter slice count as wrong; two empty slices
/// give 0.
pub fn accuracy(predicted: &[u32], expected: &[u32]) -> f64 {
    let total = predicted.len().max(expected.len());
    if total == 0 {
        return 0.0;
    }
    let correct = predicted
        .iter()
        .zip(expected)
        .filter(|(p, e)| p == e)
        .count();
    correct as f64 / total as f64
}

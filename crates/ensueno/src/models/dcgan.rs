//! DCGAN: a deep convolutional generative adversarial network, optionally
//! class-conditional, sized for MNIST-like images.
//!
//! Papers: Radford, Metz & Chintala, "Unsupervised Representation Learning
//! with Deep Convolutional Generative Adversarial Networks", 2015,
//! arXiv:1511.06434; class conditioning after Mirza & Osindero, "Conditional
//! Generative Adversarial Nets", 2014, arXiv:1411.1784.
//!
//! Reference implementation: ensueno's PyTorch twin `scripts/twins/gan.py`
//! (`Generator`, `Discriminator`); the struct trees here are its module names
//! and so the safetensors keys. The two networks are separate models, saved
//! in `generator/` and `discriminator/` subfolders (`config.json` +
//! `model.safetensors`).
//!
//! BatchNorm is `ops::batch_norm::BatchNorm2d` (momentum 0.1, eps 1e-5, as
//! PyTorch), fused with the ReLU / LeakyReLU that follows it: `train = true`
//! normalises with batch statistics and updates the running statistics,
//! `train = false` uses the running statistics.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops::batch_norm::{Activation, BatchNorm2d};
use crate::ops::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use crate::{Error, Result};

fn d_latent_dim() -> usize {
    100
}
fn d_num_classes() -> Option<usize> {
    Some(10)
}
fn d_sample_size() -> usize {
    28
}
fn d_channels() -> usize {
    1
}
fn d_base_channels() -> usize {
    64
}
fn d_label_embedding_dim() -> usize {
    50
}

/// Configuration shared by [`DCGANGenerator`] and [`DCGANDiscriminator`]; the
/// keys of their `config.json` files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DCGANConfig {
    /// Dimension of the generator's noise input.
    #[serde(default = "d_latent_dim")]
    pub latent_dim: usize,
    /// `Some(k)`: class-conditional on `k` classes; `None` (JSON `null`):
    /// unconditional.
    #[serde(default = "d_num_classes")]
    pub num_classes: Option<usize>,
    /// Image height and width; must be divisible by 4.
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    /// Image channels.
    #[serde(default = "d_channels")]
    pub channels: usize,
    /// Channels of the wider-resolution feature maps (`2 * base_channels` at
    /// a quarter of the resolution).
    #[serde(default = "d_base_channels")]
    pub base_channels: usize,
    /// Width of the class-label embeddings.
    #[serde(default = "d_label_embedding_dim")]
    pub label_embedding_dim: usize,
}

impl Default for DCGANConfig {
    fn default() -> Self {
        Self {
            latent_dim: d_latent_dim(),
            num_classes: d_num_classes(),
            sample_size: d_sample_size(),
            channels: d_channels(),
            base_channels: d_base_channels(),
            label_embedding_dim: d_label_embedding_dim(),
        }
    }
}

impl DCGANConfig {
    /// `_class_name` of the generator's `config.json`.
    pub const GENERATOR_CLASS_NAME: &'static str = "DCGANGenerator";
    /// `_class_name` of the discriminator's `config.json`.
    pub const DISCRIMINATOR_CLASS_NAME: &'static str = "DCGANDiscriminator";

    /// Reads and validates a `config.json` (of either network).
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    /// The `config.json` text with `_class_name` first: pass
    /// [`Self::GENERATOR_CLASS_NAME`] or [`Self::DISCRIMINATOR_CLASS_NAME`].
    pub fn to_json(&self, class_name: &str) -> Result<String> {
        let mut map = serde_json::Map::new();
        map.insert("_class_name".into(), class_name.into());
        if let serde_json::Value::Object(fields) =
            serde_json::to_value(self).map_err(|e| Error::invalid(e.to_string()))?
        {
            map.extend(fields);
        }
        serde_json::to_string_pretty(&serde_json::Value::Object(map))
            .map_err(|e| Error::invalid(e.to_string()))
    }

    /// Checks that every size is positive and the image quarters exactly.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("latent_dim", self.latent_dim),
            ("sample_size", self.sample_size),
            ("channels", self.channels),
            ("base_channels", self.base_channels),
            ("label_embedding_dim", self.label_embedding_dim),
        ];
        super::config_defaults::check_positive("DCGAN", &sizes)?;
        if self.num_classes == Some(0) {
            return Err(Error::invalid(
                "DCGAN config: num_classes must be > 0 (or null for an unconditional model)",
            ));
        }
        if !self.sample_size.is_multiple_of(4) {
            return Err(Error::invalid(format!(
                "DCGAN config: sample_size {} must be divisible by 4 (two stride-2 stages)",
                self.sample_size
            )));
        }
        Ok(())
    }

    /// Side of the lowest-resolution feature map.
    fn side(&self) -> usize {
        self.sample_size / 4
    }
}

/// PyTorch's `BatchNorm2d` defaults (the twin's).
fn batch_norm(channels: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
    BatchNorm2d::new(vb, channels, 1e-5, 0.1)
}

/// Checks `labels` against the model's classes: `Some` exactly when the model
/// is conditional, `[N]` integers in `0..num_classes`. Returns them as u32.
fn check_labels(
    what: &str,
    config: &DCGANConfig,
    labels: Option<&Tensor>,
    n: usize,
) -> Result<Option<Tensor>> {
    match (config.num_classes, labels) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Error::invalid(format!(
            "{what}: labels given to an unconditional model"
        ))),
        (Some(_), None) => Err(Error::invalid(format!(
            "{what}: the model is class-conditional and needs labels"
        ))),
        (Some(k), Some(labels)) => {
            if labels.dims() != [n] {
                return Err(Error::Shape {
                    what: format!("{what} labels"),
                    expected: format!("[{n}]"),
                    got: format!("{:?}", labels.dims()),
                });
            }
            if labels.dtype().is_float() {
                return Err(Error::invalid(format!(
                    "{what}: labels must be integers, got {:?}",
                    labels.dtype()
                )));
            }
            let values = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            if let Some(bad) = values.iter().find(|&&v| v < 0 || v as usize >= k) {
                return Err(Error::invalid(format!(
                    "{what}: label {bad} out of range 0..{k}"
                )));
            }
            Ok(Some(labels.to_dtype(DType::U32)?))
        }
    }
}

/// The generator: `[z ; label embedding] -> Linear -> (2b, s/4, s/4) -> BN ->
/// ReLU -> ConvTranspose(2b -> b, 4, s2, p1) -> BN -> ReLU ->
/// ConvTranspose(b -> channels, 4, s2, p1) -> tanh`.
#[derive(Debug, Clone)]
pub struct DCGANGenerator {
    pub label_emb: Option<Embedding>,
    /// No bias: BatchNorm follows.
    pub fc: Linear,
    pub bn0: BatchNorm2d,
    /// No bias: BatchNorm follows.
    pub deconv1: ConvTranspose2d,
    pub bn1: BatchNorm2d,
    pub deconv2: ConvTranspose2d,
    config: DCGANConfig,
}

impl DCGANGenerator {
    pub fn new(vb: VarBuilder, config: &DCGANConfig) -> Result<Self> {
        config.validate()?;
        let b = config.base_channels;
        let side = config.side();
        let (label_emb, in_dim) = match config.num_classes {
            Some(k) => (
                Some(candle_nn::embedding(
                    k,
                    config.label_embedding_dim,
                    vb.pp("label_emb"),
                )?),
                config.latent_dim + config.label_embedding_dim,
            ),
            None => (None, config.latent_dim),
        };
        let up = ConvTranspose2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            label_emb,
            fc: candle_nn::linear_no_bias(in_dim, 2 * b * side * side, vb.pp("fc"))?,
            bn0: batch_norm(2 * b, vb.pp("bn0"))?,
            deconv1: ConvTranspose2d::new_no_bias(vb.pp("deconv1"), 2 * b, b, 4, up)?,
            bn1: batch_norm(b, vb.pp("bn1"))?,
            deconv2: ConvTranspose2d::new(vb.pp("deconv2"), b, config.channels, 4, up)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &DCGANConfig {
        &self.config
    }

    /// Generates images in `[-1, 1]`.
    ///
    /// # Shapes
    /// - `z`: `[N, latent_dim]`
    /// - `labels`: `[N]` integer class ids (conditional models), `None` otherwise
    /// - returns `[N, channels, sample_size, sample_size]`
    ///
    /// `train`: BatchNorm on batch statistics (and running statistics updated).
    pub fn forward(&self, z: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let c = &self.config;
        if z.rank() != 2 || z.dim(1)? != c.latent_dim {
            return Err(Error::Shape {
                what: "DCGAN generator noise".into(),
                expected: format!("[N, {}]", c.latent_dim),
                got: format!("{:?}", z.dims()),
            });
        }
        let n = z.dim(0)?;
        let labels = check_labels("DCGAN generator", c, labels, n)?;
        let input = match (&self.label_emb, labels) {
            (Some(emb), Some(labels)) => {
                let e = emb.forward(&labels)?.to_dtype(z.dtype())?;
                Tensor::cat(&[z, &e], 1)?
            }
            _ => z.clone(),
        };
        let side = c.side();
        let h = self
            .fc
            .forward(&input)?
            .reshape((n, 2 * c.base_channels, side, side))?;
        let h = self.bn0.forward_t(&h, train, Activation::Relu)?;
        let h = self.deconv1.forward(&h)?;
        let h = self.bn1.forward_t(&h, train, Activation::Relu)?;
        Ok(self.deconv2.forward(&h)?.tanh()?)
    }
}

/// The discriminator: `[image ; label map] -> Conv(-> b, 4, s2, p1) ->
/// LeakyReLU(0.2) -> Conv(b -> 2b, 4, s2, p1) -> BN -> LeakyReLU(0.2) ->
/// flatten -> Linear -> 1 logit`. The label map is the label embedding mapped
/// by `label_fc` to one `sample_size x sample_size` channel.
#[derive(Debug, Clone)]
pub struct DCGANDiscriminator {
    pub label_emb: Option<Embedding>,
    pub label_fc: Option<Linear>,
    pub conv1: Conv2d,
    /// No bias: BatchNorm follows.
    pub conv2: Conv2d,
    pub bn2: BatchNorm2d,
    pub fc: Linear,
    config: DCGANConfig,
}

impl DCGANDiscriminator {
    pub fn new(vb: VarBuilder, config: &DCGANConfig) -> Result<Self> {
        config.validate()?;
        let b = config.base_channels;
        let s = config.sample_size;
        let (label_emb, label_fc) = match config.num_classes {
            Some(k) => (
                Some(candle_nn::embedding(
                    k,
                    config.label_embedding_dim,
                    vb.pp("label_emb"),
                )?),
                Some(candle_nn::linear(
                    config.label_embedding_dim,
                    s * s,
                    vb.pp("label_fc"),
                )?),
            ),
            None => (None, None),
        };
        let extra = usize::from(config.num_classes.is_some());
        let down = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let side = config.side();
        Ok(Self {
            label_emb,
            label_fc,
            conv1: Conv2d::new(vb.pp("conv1"), config.channels + extra, b, 4, down)?,
            conv2: Conv2d::new_no_bias(vb.pp("conv2"), b, 2 * b, 4, down)?,
            bn2: batch_norm(2 * b, vb.pp("bn2"))?,
            fc: candle_nn::linear(2 * b * side * side, 1, vb.pp("fc"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &DCGANConfig {
        &self.config
    }

    /// Real/fake logits (positive = real).
    ///
    /// # Shapes
    /// - `images`: `[N, channels, sample_size, sample_size]` in `[-1, 1]`
    /// - `labels`: `[N]` integer class ids (conditional models), `None` otherwise
    /// - returns `[N]`
    ///
    /// `train`: BatchNorm on batch statistics (and running statistics updated).
    pub fn forward(&self, images: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let s = c.sample_size;
        if images.rank() != 4 || images.dims()[1..] != [c.channels, s, s] {
            return Err(Error::Shape {
                what: "DCGAN discriminator images".into(),
                expected: format!("[N, {}, {s}, {s}]", c.channels),
                got: format!("{:?}", images.dims()),
            });
        }
        let n = images.dim(0)?;
        let labels = check_labels("DCGAN discriminator", c, labels, n)?;
        let x = match (&self.label_emb, &self.label_fc, labels) {
            (Some(emb), Some(fc), Some(labels)) => {
                let e = emb.forward(&labels)?.to_dtype(images.dtype())?;
                let map = fc.forward(&e)?.reshape((n, 1, s, s))?;
                Tensor::cat(&[images, &map], 1)?
            }
            _ => images.clone(),
        };
        let h = Activation::LeakyRelu(0.2).apply(&self.conv1.forward(&x)?)?;
        let h = self.conv2.forward(&h)?;
        let h = self.bn2.forward_t(&h, train, Activation::LeakyRelu(0.2))?;
        Ok(self.fc.forward(&h.flatten_from(1)?)?.squeeze(1)?)
    }
}

/// `softplus(x) = log(1 + exp(x))`, stable for large `|x|`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// The discriminator's loss: binary cross-entropy with logits of real images
/// against 1 plus fake images against 0, each averaged over the batch:
/// `mean(softplus(-real)) + mean(softplus(fake))`.
pub fn discriminator_loss(real_logits: &Tensor, fake_logits: &Tensor) -> Result<Tensor> {
    let real = softplus(&real_logits.neg()?)?.mean_all()?;
    let fake = softplus(fake_logits)?.mean_all()?;
    Ok((real + fake)?)
}

/// The generator's non-saturating loss `mean(-log D(G(z))) =
/// mean(softplus(-fake))`.
pub fn generator_loss(fake_logits: &Tensor) -> Result<Tensor> {
    softplus(&fake_logits.neg()?)?
        .mean_all()
        .map_err(Error::from)
}

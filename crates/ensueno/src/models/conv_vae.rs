//! ConvVAE: the small convolutional variational autoencoder of the Keras
//! "Variational AutoEncoder" example (keras.io/examples/generative/vae), with
//! a two-dimensional latent space that can be plotted.
//!
//! Paper: Kingma & Welling, "Auto-Encoding Variational Bayes", 2013,
//! arXiv:1312.6114.
//!
//! Reference implementation: the Keras example, re-expressed with PyTorch
//! layer semantics in ensueno's twin `scripts/twins/vae.py` (`ConvVAE`),
//! whose module names are the safetensors keys loaded here
//! (`encoder.conv1`, ..., `decoder.deconv3`). One deliberate difference from
//! Keras: stride-2 convolutions pad one pixel on every side (PyTorch), where
//! Keras' `"same"` pads only bottom/right.
//!
//! The decoder returns logits; the reconstruction loss is a binary
//! cross-entropy computed from them, which stays finite where a sigmoid
//! saturates.

use std::path::Path;

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use crate::{Error, Result};

fn d_in_channels() -> usize {
    1
}
fn d_sample_size() -> usize {
    28
}
fn d_conv_channels() -> Vec<usize> {
    vec![32, 64]
}
fn d_dense_dim() -> usize {
    16
}
fn d_latent_dim() -> usize {
    2
}

/// Configuration of [`ConvVAE`]; the keys of its `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvVAEConfig {
    /// Image channels (1 for MNIST).
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    /// Image height and width; must be divisible by `2^conv_channels.len()`.
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    /// Output channels of the stride-2 encoder convolutions (mirrored by the
    /// decoder's transposed convolutions).
    #[serde(default = "d_conv_channels")]
    pub conv_channels: Vec<usize>,
    /// Width of the encoder's hidden dense layer.
    #[serde(default = "d_dense_dim")]
    pub dense_dim: usize,
    /// Dimension of the latent space.
    #[serde(default = "d_latent_dim")]
    pub latent_dim: usize,
}

impl Default for ConvVAEConfig {
    fn default() -> Self {
        Self {
            in_channels: d_in_channels(),
            sample_size: d_sample_size(),
            conv_channels: d_conv_channels(),
            dense_dim: d_dense_dim(),
            latent_dim: d_latent_dim(),
        }
    }
}

impl ConvVAEConfig {
    /// The `_class_name` written into `config.json`.
    pub const CLASS_NAME: &'static str = "ConvVAE";

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    /// The `config.json` text, with `_class_name` first.
    pub fn to_json(&self) -> Result<String> {
        let mut map = serde_json::Map::new();
        map.insert("_class_name".into(), Self::CLASS_NAME.into());
        if let serde_json::Value::Object(fields) =
            serde_json::to_value(self).map_err(|e| Error::invalid(e.to_string()))?
        {
            map.extend(fields);
        }
        serde_json::to_string_pretty(&serde_json::Value::Object(map))
            .map_err(|e| Error::invalid(e.to_string()))
    }

    /// Side of the feature map after the encoder's convolutions.
    pub fn bottleneck_size(&self) -> usize {
        self.sample_size >> self.conv_channels.len()
    }

    /// Checks that every size is positive and the image halves exactly.
    pub fn validate(&self) -> Result<()> {
        let zero = [
            ("in_channels", self.in_channels),
            ("sample_size", self.sample_size),
            ("dense_dim", self.dense_dim),
            ("latent_dim", self.latent_dim),
        ];
        super::config_defaults::check_positive("ConvVAE", &zero)?;
        if self.conv_channels.is_empty() || self.conv_channels.contains(&0) {
            return Err(Error::invalid(format!(
                "ConvVAE config: conv_channels must be a non-empty list of positive numbers, got {:?}",
                self.conv_channels
            )));
        }
        let n = self.conv_channels.len();
        if n >= usize::BITS as usize || !self.sample_size.is_multiple_of(1 << n) {
            return Err(Error::invalid(format!(
                "ConvVAE config: sample_size {} must be divisible by 2^{n} (one halving per conv_channels entry)",
                self.sample_size
            )));
        }
        Ok(())
    }
}

/// The encoder: stride-2 convolutions, a dense layer and the two heads of the
/// approximate posterior `q(z|x) = N(z_mean, exp(z_log_var))`.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// `convs[i]` holds the keys `conv{i + 1}.*` (numbered as in the twin,
    /// whose depth follows `conv_channels`).
    pub convs: Vec<Conv2d>,
    pub dense: Linear,
    pub z_mean: Linear,
    pub z_log_var: Linear,
}

impl Encoder {
    pub fn new(vb: VarBuilder, config: &ConvVAEConfig) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let mut convs = Vec::with_capacity(config.conv_channels.len());
        let mut c = config.in_channels;
        for (i, &co) in config.conv_channels.iter().enumerate() {
            convs.push(Conv2d::new(vb.pp(format!("conv{}", i + 1)), c, co, 3, cfg)?);
            c = co;
        }
        let side = config.bottleneck_size();
        let dense = candle_nn::linear(c * side * side, config.dense_dim, vb.pp("dense"))?;
        let z_mean = candle_nn::linear(config.dense_dim, config.latent_dim, vb.pp("z_mean"))?;
        let z_log_var = candle_nn::linear(config.dense_dim, config.latent_dim, vb.pp("z_log_var"))?;
        Ok(Self {
            convs,
            dense,
            z_mean,
            z_log_var,
        })
    }

    /// # Shapes
    /// `x [N, C, S, S]` -> `(z_mean [N, L], z_log_var [N, L])`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h)?.relu()?;
        }
        let h = self.dense.forward(&h.flatten_from(1)?)?.relu()?;
        Ok((self.z_mean.forward(&h)?, self.z_log_var.forward(&h)?))
    }
}

/// The decoder: a dense layer to the bottleneck feature map, stride-2
/// transposed convolutions back to full size and a last stride-1 transposed
/// convolution to the image channels.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub dense: Linear,
    /// `deconvs[i]` holds the keys `deconv{i + 1}.*`.
    pub deconvs: Vec<ConvTranspose2d>,
    top_channels: usize,
    side: usize,
}

impl Decoder {
    pub fn new(vb: VarBuilder, config: &ConvVAEConfig) -> Result<Self> {
        let side = config.bottleneck_size();
        let top = *config
            .conv_channels
            .last()
            .ok_or_else(|| Error::invalid("ConvVAE config: conv_channels is empty"))?;
        let dense = candle_nn::linear(config.latent_dim, top * side * side, vb.pp("dense"))?;
        let up = ConvTranspose2dConfig {
            padding: 1,
            output_padding: 1,
            stride: 2,
            ..Default::default()
        };
        let mut deconvs = Vec::with_capacity(config.conv_channels.len() + 1);
        let mut c = top;
        for (i, &co) in config.conv_channels.iter().rev().enumerate() {
            deconvs.push(ConvTranspose2d::new(
                vb.pp(format!("deconv{}", i + 1)),
                c,
                co,
                3,
                up,
            )?);
            c = co;
        }
        let last = ConvTranspose2dConfig {
            padding: 1,
            ..Default::default()
        };
        deconvs.push(ConvTranspose2d::new(
            vb.pp(format!("deconv{}", deconvs.len() + 1)),
            c,
            config.in_channels,
            3,
            last,
        )?);
        Ok(Self {
            dense,
            deconvs,
            top_channels: top,
            side,
        })
    }

    /// # Shapes
    /// `z [N, L]` -> logits `[N, C, S, S]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let mut h =
            self.dense
                .forward(z)?
                .relu()?
                .reshape((n, self.top_channels, self.side, self.side))?;
        let last = self.deconvs.len() - 1;
        for (i, deconv) in self.deconvs.iter().enumerate() {
            h = deconv.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Everything one training forward computes.
#[derive(Debug, Clone)]
pub struct VaeOutput {
    /// Posterior mean `[N, L]`.
    pub z_mean: Tensor,
    /// Posterior log-variance `[N, L]`.
    pub z_log_var: Tensor,
    /// The reparameterised sample `z_mean + exp(z_log_var / 2) * eps`, `[N, L]`.
    pub z: Tensor,
    /// Decoder logits of `z`, `[N, C, S, S]`; the image is their sigmoid.
    pub logits: Tensor,
}

/// The three terms of the VAE loss (0-d tensors), as the Keras example reports them.
#[derive(Debug, Clone)]
pub struct VaeLoss {
    /// `reconstruction + kl`, the quantity minimised.
    pub total: Tensor,
    /// Mean over the batch of the per-image sum of pixel binary cross-entropies.
    pub reconstruction: Tensor,
    /// Mean over the batch of `KL(q(z|x) || N(0, I))`.
    pub kl: Tensor,
}

/// The variational autoencoder of the Keras example.
#[derive(Debug, Clone)]
pub struct ConvVAE {
    pub encoder: Encoder,
    pub decoder: Decoder,
    config: ConvVAEConfig,
}

impl ConvVAE {
    /// Builds the model from `vb` (keys `encoder.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, config: &ConvVAEConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ConvVAEConfig {
        &self.config
    }

    fn check_image(&self, x: &Tensor) -> Result<()> {
        let c = &self.config;
        let ok = x.rank() == 4 && x.dims()[1..] == [c.in_channels, c.sample_size, c.sample_size];
        if !ok {
            return Err(Error::Shape {
                what: "ConvVAE input image".into(),
                expected: format!(
                    "[N, {}, {}, {}]",
                    c.in_channels, c.sample_size, c.sample_size
                ),
                got: format!("{:?}", x.dims()),
            });
        }
        Ok(())
    }

    fn check_latent(&self, z: &Tensor, what: &str) -> Result<()> {
        if z.rank() != 2 || z.dim(1)? != self.config.latent_dim {
            return Err(Error::Shape {
                what: format!("ConvVAE {what}"),
                expected: format!("[N, {}]", self.config.latent_dim),
                got: format!("{:?}", z.dims()),
            });
        }
        Ok(())
    }

    /// The posterior of a batch of images in `[0, 1]`.
    ///
    /// # Shapes
    /// `x [N, C, S, S]` -> `(z_mean [N, L], z_log_var [N, L])`.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_image(x)?;
        self.encoder.forward(x)
    }

    /// Decoder logits of latents.
    ///
    /// # Shapes
    /// `z [N, L]` -> `[N, C, S, S]`.
    pub fn decode_logits(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latent(z, "latent")?;
        self.decoder.forward(z)
    }

    /// Decoded images in `[0, 1]` (sigmoid of [`ConvVAE::decode_logits`]).
    ///
    /// # Shapes
    /// `z [N, L]` -> `[N, C, S, S]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(&self.decode_logits(z)?)?)
    }

    /// Encodes, samples `z` by reparameterisation with the caller's noise
    /// (so that training is seeded by the caller) and decodes.
    ///
    /// # Shapes
    /// - `x`: `[N, C, S, S]`, images in `[0, 1]`
    /// - `eps`: `[N, L]`, standard normal noise
    pub fn forward(&self, x: &Tensor, eps: &Tensor) -> Result<VaeOutput> {
        let (z_mean, z_log_var) = self.encode(x)?;
        self.check_latent(eps, "eps")?;
        if eps.dim(0)? != x.dim(0)? {
            return Err(Error::Shape {
                what: "ConvVAE eps".into(),
                expected: format!("[{}, {}]", x.dim(0)?, self.config.latent_dim),
                got: format!("{:?}", eps.dims()),
            });
        }
        let std = (&z_log_var * 0.5)?.exp()?;
        let z = (&z_mean + std.mul(eps)?)?;
        let logits = self.decoder.forward(&z)?;
        Ok(VaeOutput {
            z_mean,
            z_log_var,
            z,
            logits,
        })
    }
}

/// Binary cross-entropy of `sigmoid(logits)` against targets in `[0, 1]`,
/// per element: `max(l, 0) - l t + log(1 + exp(-|l|))`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        return Err(Error::Shape {
            what: "binary cross-entropy targets".into(),
            expected: format!("{:?}", logits.dims()),
            got: format!("{:?}", targets.dims()),
        });
    }
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((logits.relu()? - logits.mul(targets)?)? + softplus_neg_abs)?)
}

/// The Keras example's loss: reconstruction (per-image sum of pixel BCEs,
/// averaged over the batch) plus the KL divergence to `N(0, I)` (per-image
/// sum over latent dims, averaged over the batch).
///
/// # Shapes
/// `x [N, C, S, S]` (targets in `[0, 1]`) and `out` from [`ConvVAE::forward`].
pub fn vae_loss(x: &Tensor, out: &VaeOutput) -> Result<VaeLoss> {
    let n = x.dim(0)?;
    let reconstruction = bce_with_logits(&out.logits, x)?
        .reshape((n, ()))?
        .sum(D::Minus1)?
        .mean(0)?;
    let kl_terms = ((out.z_log_var.clone() + 1.0)? - out.z_mean.sqr()? - out.z_log_var.exp()?)?;
    let kl = (kl_terms.sum(D::Minus1)? * -0.5)?.mean(0)?;
    let total = (&reconstruction + &kl)?;
    Ok(VaeLoss {
        total,
        reconstruction,
        kl,
    })
}

//! The KL-regularised variational autoencoder that maps images to and from
//! the latent space of Stable Diffusion.
//!
//! Kingma, Welling, "Auto-Encoding Variational Bayes", 2013, arXiv:1312.6114;
//! Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
//! Models", 2021, arXiv:2112.10752.
//!
//! Reference implementation:
//! `diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL` and
//! `diffusers.models.autoencoders.vae.DiagonalGaussianDistribution`.

use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ops::conv::Conv2d;
use serde::{Deserialize, Serialize};

use super::config_defaults::{d_1, d_3, d_32, d_4, d_silu, d_true};
use crate::models::resnet::{conv2d, Activation};
use crate::models::vae::{Decoder, Encoder, VaeCoderConfig};
use crate::{Error, Result};

fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".to_string()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".to_string()]
}
fn d_channels() -> Vec<usize> {
    vec![64]
}
fn d_scaling() -> f64 {
    0.18215
}

/// `vae/config.json` of a diffusers `AutoencoderKL`: keys and defaults as in
/// diffusers 0.42 (unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_32")]
    pub sample_size: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Run the VAE in f32 even when the pipeline uses f16 (SD 1.x/2.x VAEs
    /// overflow in f16). Advisory: the caller picks the dtype.
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// diffusers' defaults (a one-block, 64-channel autoencoder).
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

impl AutoencoderKLConfig {
    /// Reads and parses `vae/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::io::model_folder::read_json(path.as_ref())
    }

    /// The VAE of Stable Diffusion 1.5: `vae/config.json` of the Hugging Face
    /// repository `stable-diffusion-v1-5/stable-diffusion-v1-5` (formerly
    /// `runwayml/stable-diffusion-v1-5`; SD 2.x uses the same VAE shape).
    pub fn stable_diffusion_v1_5() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".to_string(); 4],
            up_block_types: vec!["UpDecoderBlock2D".to_string(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: 512,
            ..Self::default()
        }
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the encoder's posterior
/// `N(mean, std^2)` per latent element, with the log-variance clamped to
/// [-30, 20].
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution {
    mean: Tensor,
    std: Tensor,
}

impl DiagonalGaussianDistribution {
    /// From the encoder's `[B, 2C, h, w]` moments (mean, then log-variance).
    pub fn new(parameters: &Tensor) -> Result<Self> {
        let c2 = parameters.dim(1)?;
        if c2 % 2 != 0 {
            return Err(Error::Shape {
                what: "posterior moments".to_string(),
                expected: "[B, 2C, h, w]".to_string(),
                got: format!("{:?}", parameters.dims()),
            });
        }
        let c = c2 / 2;
        let mean = parameters.narrow(1, 0, c)?;
        let logvar = parameters.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(Self { mean, std })
    }

    /// `[B, C, h, w]`.
    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// `[B, C, h, w]`.
    pub fn std(&self) -> &Tensor {
        &self.std
    }

    /// The mode of the distribution (its mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `mean + std * noise`, with `noise ~ N(0, 1)` of the mean's shape
    /// supplied by the caller (so seeding stays in the caller's hands).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::Shape {
                what: "posterior sample noise".to_string(),
                expected: format!("{:?}", self.mean.dims()),
                got: format!("{:?}", noise.dims()),
            });
        }
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (&self.std * noise)?)?)
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        let act = Activation::from_name(&config.act_fn)?;
        let lc = config.latent_channels;
        let coder = |in_c, out_c, types: &[String]| VaeCoderConfig {
            in_channels: in_c,
            out_channels: out_c,
            block_types: types.to_vec(),
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            norm_num_groups: config.norm_num_groups,
            act_fn: act,
            double_z: true,
            mid_block_add_attention: config.mid_block_add_attention,
        };
        let encoder = Encoder::new(
            vb.pp("encoder"),
            &coder(config.in_channels, lc, &config.down_block_types),
        )?;
        let decoder = Decoder::new(
            vb.pp("decoder"),
            &coder(lc, config.out_channels, &config.up_block_types),
        )?;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(2 * lc, 2 * lc, 1, 1, 0, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(lc, lc, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Latents are multiplied by this before the UNet sees them.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Latents are shifted by this before scaling (SD3/Flux-style VAEs).
    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    /// Encodes images to the posterior over (unscaled) latents.
    ///
    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]` with values in [-1, 1]
    /// - the distribution's tensors are `[B, latent_channels, H/f, W/f]`,
    ///   `f = 2^(blocks-1)`
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussianDistribution> {
        let (_, c, _, _) = x.dims4().map_err(|_| self.image_shape_error(x))?;
        if c != self.config.in_channels {
            return Err(self.image_shape_error(x));
        }
        let mut moments = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussianDistribution::new(&moments)
    }

    /// Decodes unscaled latents (divide the UNet's latents by
    /// [`Self::scaling_factor`] first, as diffusers' pipelines do).
    ///
    /// # Shapes
    /// - `z`: `[B, latent_channels, h, w]`
    /// - returns `[B, out_channels, h*f, w*f]`, roughly in [-1, 1]
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let lc = self.config.latent_channels;
        let ok = matches!(z.dims(), [_, c, _, _] if *c == lc);
        if !ok {
            return Err(Error::Shape {
                what: "VAE latents".to_string(),
                expected: format!("[B, {lc}, h, w]"),
                got: format!("{:?}", z.dims()),
            });
        }
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    fn image_shape_error(&self, x: &Tensor) -> Error {
        Error::Shape {
            what: "VAE input image".to_string(),
            expected: format!("[B, {}, H, W]", self.config.in_channels),
            got: format!("{:?}", x.dims()),
        }
    }
}

//! Spatial 2x downsampling layer of the UNet and VAE encoders.
//!
//! Strided-convolution downsampling as in Ho, Jain, Abbeel, "Denoising
//! Diffusion Probabilistic Models", 2020, arXiv:2006.11239, and Rombach et al.,
//! "High-Resolution Image Synthesis with Latent Diffusion Models", 2021,
//! arXiv:2112.10752.
//!
//! Reference implementation: `diffusers.models.downsampling.Downsample2D`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ops::conv::Conv2d;

use crate::models::resnet::conv2d;
use crate::{Error, Result};

/// diffusers' `Downsample2D` (`downsamplers.0` in checkpoints; its conv is
/// stored as `conv`).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Option<Conv2d>,
    padding: usize,
    channels: usize,
}

impl Downsample2D {
    /// `use_conv` picks a stride-2 3x3 conv (else a 2x2 average pool, which
    /// keeps the channel count). With `padding == 0` the input is padded by
    /// one on the right and bottom only, as the VAE encoder expects.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        use_conv: bool,
        out_channels: Option<usize>,
        padding: usize,
    ) -> Result<Self> {
        let out = out_channels.unwrap_or(channels);
        let conv = if use_conv {
            Some(conv2d(channels, out, 3, 2, padding, vb.pp("conv"))?)
        } else {
            if out != channels {
                return Err(Error::invalid(format!(
                    "Downsample2D: average pooling cannot change channels ({channels} -> {out})"
                )));
            }
            None
        };
        Ok(Self {
            conv,
            padding,
            channels,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, channels, H, W]`
    /// - returns `[B, out_channels, ceil(H/2), ceil(W/2)]` (conv, padding 1),
    ///   `[B, out_channels, floor(H/2), floor(W/2)]` otherwise
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let c = xs.dim(1)?;
        if c != self.channels {
            return Err(Error::Shape {
                what: "Downsample2D input".to_string(),
                expected: format!("[B, {}, H, W]", self.channels),
                got: format!("{:?}", xs.dims()),
            });
        }
        match &self.conv {
            Some(conv) => {
                if self.padding == 0 {
                    let padded = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                    Ok(conv.forward(&padded)?)
                } else {
                    Ok(conv.forward(xs)?)
                }
            }
            None => Ok(xs.avg_pool2d(2)?),
        }
    }
}

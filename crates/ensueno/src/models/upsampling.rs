//! Spatial 2x upsampling layer of the UNet and VAE decoders: nearest-neighbour
//! interpolation followed by a 3x3 conv.
//!
//! As in Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020,
//! arXiv:2006.11239.
//!
//! Reference implementation: `diffusers.models.upsampling.Upsample2D`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ops::conv::Conv2d;

use crate::models::resnet::conv2d;
use crate::{Error, Result};

/// diffusers' `Upsample2D` (`upsamplers.0` in checkpoints, conv as `conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Option<Conv2d>,
    channels: usize,
}

impl Upsample2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        use_conv: bool,
        out_channels: Option<usize>,
    ) -> Result<Self> {
        let out = out_channels.unwrap_or(channels);
        let conv = if use_conv {
            Some(conv2d(channels, out, 3, 1, 1, vb.pp("conv"))?)
        } else {
            None
        };
        Ok(Self { conv, channels })
    }

    /// Nearest upsampling to twice the size, or to `output_size` (height,
    /// width) when given (PyTorch's `interpolate(size=..., mode="nearest")`,
    /// which the UNet uses to match skip connections of odd sizes).
    ///
    /// # Shapes
    /// - `xs`: `[B, channels, H, W]`
    /// - returns `[B, out_channels, 2H, 2W]` or `[B, out_channels, oh, ow]`
    pub fn forward(&self, xs: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, c, h, w) = xs.dims4()?;
        if c != self.channels {
            return Err(Error::Shape {
                what: "Upsample2D input".to_string(),
                expected: format!("[B, {}, H, W]", self.channels),
                got: format!("{:?}", xs.dims()),
            });
        }
        let (oh, ow) = output_size.unwrap_or((2 * h, 2 * w));
        let up = xs.upsample_nearest2d(oh, ow)?;
        match &self.conv {
            Some(conv) => Ok(conv.forward(&up)?),
            None => Ok(up),
        }
    }
}

//! ResNet blocks of the diffusion UNet and the VAE, and the activation
//! functions they are configured with.
//!
//! Residual learning: He, Zhang, Ren, Sun, "Deep Residual Learning for Image
//! Recognition", 2015, arXiv:1512.03385; the pre-norm GroupNorm + SiLU variant
//! with a time-embedding projection follows Ho, Jain, Abbeel, "Denoising
//! Diffusion Probabilistic Models", 2020, arXiv:2006.11239.
//!
//! Reference implementation: `diffusers.models.resnet.ResnetBlock2D` and
//! `diffusers.models.activations.get_activation`.

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::ops::conv::{Conv2d, Conv2dConfig};
use crate::ops::group_norm::GroupNorm;

use crate::{Error, Result};

/// The activations diffusers' `get_activation` knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`: x * sigmoid(x).
    Silu,
    /// `gelu`: the exact (erf) GELU of `torch.nn.GELU()`.
    Gelu,
    /// `mish`: x * tanh(softplus(x)).
    Mish,
    /// `relu`.
    Relu,
}

impl Activation {
    /// The activation diffusers calls `name`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "mish" => Ok(Self::Mish),
            "relu" => Ok(Self::Relu),
            other => Err(Error::UnknownName {
                kind: "activation function",
                name: other.to_string(),
                expected: "silu, swish, gelu, mish, relu".to_string(),
            }),
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(xs),
            Self::Gelu => xs.gelu_erf(),
            Self::Mish => {
                let softplus = (xs.exp()? + 1.0)?.log()?;
                xs * softplus.tanh()?
            }
            Self::Relu => xs.relu(),
        }
    }
}

/// How a ResNet block injects the time embedding
/// (diffusers' `resnet_time_scale_shift` / `time_embedding_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `default`: the projected embedding is added after `conv1`.
    Default,
    /// `scale_shift`: the projection gives (scale, shift) applied after `norm2`.
    ScaleShift,
}

impl TimeEmbeddingNorm {
    /// Parses diffusers' `resnet_time_scale_shift` value.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "default" => Ok(Self::Default),
            "scale_shift" => Ok(Self::ScaleShift),
            other => Err(Error::UnknownName {
                kind: "resnet_time_scale_shift",
                name: other.to_string(),
                expected: "default, scale_shift".to_string(),
            }),
        }
    }
}

/// Settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    /// Defaults to `in_channels`.
    pub out_channels: Option<usize>,
    /// Width of the time embedding; `None` builds no `time_emb_proj` (VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    /// Groups of `norm2`; defaults to `groups`.
    pub groups_out: Option<usize>,
    pub eps: f64,
    pub non_linearity: Activation,
    pub output_scale_factor: f64,
    pub time_embedding_norm: TimeEmbeddingNorm,
}

impl ResnetBlock2DConfig {
    /// diffusers' defaults for a block from `in_channels` to `out_channels`
    /// with a time embedding of width `temb_channels`.
    pub fn new(in_channels: usize, out_channels: usize, temb_channels: Option<usize>) -> Self {
        Self {
            in_channels,
            out_channels: Some(out_channels),
            temb_channels,
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            non_linearity: Activation::Silu,
            output_scale_factor: 1.0,
            time_embedding_norm: TimeEmbeddingNorm::Default,
        }
    }
}

pub(crate) fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Conv2d::new(vb, in_channels, out_channels, kernel, cfg)
}

/// `act(norm(x))`, in one fused pass when the activation is SiLU (the
/// case of every Stable Diffusion UNet and VAE).
pub(crate) fn norm_act(norm: &GroupNorm, act: &Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Silu => norm.forward_silu(xs),
        _ => Ok(norm.forward(xs)?.apply(act)?),
    }
}

pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::invalid(format!(
            "group norm {}: {channels} channels are not divisible into {groups} groups",
            vb.prefix()
        )));
    }
    GroupNorm::new(vb, groups, channels, eps)
}

// candle's GroupNorm computes its statistics in f32 for half-precision inputs,
// so the norms here need no explicit upcast.

/// diffusers' `ResnetBlock2D` (`resnets.N` in checkpoints).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    non_linearity: Activation,
    output_scale_factor: f64,
    time_embedding_norm: TimeEmbeddingNorm,
    out_channels: usize,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, config: &ResnetBlock2DConfig) -> Result<Self> {
        let in_c = config.in_channels;
        let out_c = config.out_channels.unwrap_or(in_c);
        let groups_out = config.groups_out.unwrap_or(config.groups);
        let norm1 = group_norm(config.groups, in_c, config.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(in_c, out_c, 3, 1, 1, vb.pp("conv1"))?;
        let time_emb_proj = match config.temb_channels {
            None => None,
            Some(t) => {
                let width = match config.time_embedding_norm {
                    TimeEmbeddingNorm::Default => out_c,
                    TimeEmbeddingNorm::ScaleShift => 2 * out_c,
                };
                Some(candle_nn::linear(t, width, vb.pp("time_emb_proj"))?)
            }
        };
        let norm2 = group_norm(groups_out, out_c, config.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(out_c, out_c, 3, 1, 1, vb.pp("conv2"))?;
        let conv_shortcut = if in_c != out_c {
            Some(conv2d(in_c, out_c, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            non_linearity: config.non_linearity,
            output_scale_factor: config.output_scale_factor,
            time_embedding_norm: config.time_embedding_norm,
            out_channels: out_c,
        })
    }

    /// Number of output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Applies the block.
    ///
    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`
    /// - `temb`: `[B, temb_channels]`, required when the block has a time
    ///   projection and ignored otherwise
    /// - returns `[B, out_channels, H, W]`
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let act = &self.non_linearity;
        let mut h = norm_act(&self.norm1, act, xs)?;
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(&t.apply(act)?)?),
            (Some(_), None) => {
                return Err(Error::invalid(
                    "ResnetBlock2D: this block needs a time embedding but none was given",
                ))
            }
            (None, _) => None,
        };
        // The default time embedding is a per-sample bias of conv1, added
        // inside the convolution.
        h = match (&temb, self.time_embedding_norm) {
            (Some(t), TimeEmbeddingNorm::Default) => self.conv1.forward_add(&h, t)?,
            _ => self.conv1.forward(&h)?,
        };
        h = match (&temb, self.time_embedding_norm) {
            (Some(t), TimeEmbeddingNorm::ScaleShift) => {
                let t = t.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?;
                let scale = t.narrow(1, 0, self.out_channels)?;
                let shift = t.narrow(1, self.out_channels, self.out_channels)?;
                let h = self.norm2.forward(&h)?;
                h.broadcast_mul(&(scale + 1.0)?)?
                    .broadcast_add(&shift)?
                    .apply(act)?
            }
            _ => norm_act(&self.norm2, act, &h)?,
        };
        let shortcut = match &self.conv_shortcut {
            // conv2's bias moves into the shortcut conv's (a [C] add), so
            // that the residual add happens inside conv2.
            Some(c) => match (&c.bias, &self.conv2.bias) {
                (Some(b_sc), Some(b2)) => {
                    let bias = (b_sc + b2)?;
                    crate::ops::conv::conv2d(xs, &c.weight, Some(&bias), &c.config)?
                }
                _ => c.forward(xs)?,
            },
            None => xs.clone(),
        };
        let out = match (&self.conv_shortcut, &self.conv2.bias) {
            (Some(c), Some(_)) if c.bias.is_some() => {
                crate::ops::conv::conv2d_add(&h, &self.conv2.weight, &shortcut, &self.conv2.config)?
            }
            _ => (shortcut + self.conv2.forward(&h)?)?,
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

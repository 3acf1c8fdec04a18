//! The spatial transformer of the latent diffusion UNet: group norm, a
//! projection to tokens, a stack of transformer blocks with cross-attention to
//! the text encoder, a projection back and a residual connection.
//!
//! Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
//! Models", 2021, arXiv:2112.10752.
//!
//! Reference implementation:
//! `diffusers.models.transformers.transformer_2d.Transformer2DModel`
//! (continuous inputs).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::ops::linear::{linear, Linear};

use crate::ops::conv::Conv2d;
use crate::ops::group_norm::GroupNorm;

use crate::models::attention::{BasicTransformerBlock, BasicTransformerBlockConfig};
use crate::models::resnet::{conv2d, group_norm};
use crate::{Error, Result};

/// Settings of a [`Transformer2DModel`] over continuous (image) inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Transformer2DModelConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub cross_attention_dim: Option<usize>,
    pub norm_num_groups: usize,
    /// `proj_in`/`proj_out` are linear layers (SD 2.x) instead of 1x1 convs.
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` (`attentions.N` in UNet blocks).
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    in_channels: usize,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, config: &Transformer2DModelConfig) -> Result<Self> {
        let c = config.in_channels;
        let inner = config.num_attention_heads * config.attention_head_dim;
        if inner == 0 {
            return Err(Error::invalid(format!(
                "Transformer2DModel {}: {} heads of width {} is empty",
                vb.prefix(),
                config.num_attention_heads,
                config.attention_head_dim
            )));
        }
        let norm = group_norm(config.norm_num_groups, c, 1e-6, vb.pp("norm"))?;
        let (proj_in, proj_out) = if config.use_linear_projection {
            (
                Projection::Linear(linear(c, inner, vb.pp("proj_in"))?),
                Projection::Linear(linear(inner, c, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(conv2d(c, inner, 1, 1, 0, vb.pp("proj_in"))?),
                Projection::Conv(conv2d(inner, c, 1, 1, 0, vb.pp("proj_out"))?),
            )
        };
        let block = BasicTransformerBlockConfig {
            dim: inner,
            num_attention_heads: config.num_attention_heads,
            attention_head_dim: config.attention_head_dim,
            cross_attention_dim: config.cross_attention_dim,
            only_cross_attention: config.only_cross_attention,
            upcast_attention: config.upcast_attention,
        };
        let vb_blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..config.num_layers)
            .map(|i| BasicTransformerBlock::new(vb_blocks.pp(i), &block))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
            in_channels: c,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`
    /// - `encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - returns `[B, in_channels, H, W]`
    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        if c != self.in_channels {
            return Err(Error::Shape {
                what: "Transformer2DModel input".to_string(),
                expected: format!("[B, {}, H, W]", self.in_channels),
                got: format!("{:?}", xs.dims()),
            });
        }
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let inner = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, encoder_hidden_states)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            let inner = t.dim(2)?;
            Ok(t.reshape((b, h, w, inner))?.permute((0, 3, 1, 2))?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(tokens)?.contiguous()?)?,
            Projection::Linear(lin) => to_image(lin.forward(&tokens)?)?,
        };
        Ok((out + xs)?)
    }
}

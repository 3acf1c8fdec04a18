//! The convolutional encoder and decoder of the KL-regularised autoencoder of
//! latent diffusion.
//!
//! Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image
//! Synthesis", 2020, arXiv:2012.09841; Rombach et al., "High-Resolution Image
//! Synthesis with Latent Diffusion Models", 2021, arXiv:2112.10752.
//!
//! Reference implementation: `diffusers.models.autoencoders.vae`
//! (`Encoder`, `Decoder`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ops::conv::Conv2d;
use crate::ops::group_norm::GroupNorm;

use crate::models::resnet::{conv2d, group_norm, Activation, TimeEmbeddingNorm};
use crate::models::unet_2d_blocks::{
    DownBlockConfig, DownEncoderBlock2D, MidBlockConfig, ResnetSettings, UNetMidBlock2D,
    UpBlockConfig, UpDecoderBlock2D,
};
use crate::{Error, Result};

/// Settings shared by [`Encoder`] and [`Decoder`].
#[derive(Debug, Clone, PartialEq)]
pub struct VaeCoderConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `DownEncoderBlock2D` (encoder) or `UpDecoderBlock2D` (decoder) names.
    pub block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub act_fn: Activation,
    /// Encoder only: output mean and log-variance (2x channels).
    pub double_z: bool,
    pub mid_block_add_attention: bool,
}

fn settings(config: &VaeCoderConfig) -> ResnetSettings {
    ResnetSettings {
        temb_channels: None,
        eps: 1e-6,
        act_fn: config.act_fn,
        groups: config.norm_num_groups,
        time_scale_shift: TimeEmbeddingNorm::Default,
        output_scale_factor: 1.0,
    }
}

fn check_blocks(config: &VaeCoderConfig, expected: &'static str) -> Result<()> {
    if config.block_out_channels.is_empty() {
        return Err(Error::invalid("VAE: `block_out_channels` is empty"));
    }
    if config.block_types.len() != config.block_out_channels.len() {
        return Err(Error::invalid(format!(
            "VAE: {} block types for {} `block_out_channels`",
            config.block_types.len(),
            config.block_out_channels.len()
        )));
    }
    if let Some(other) = config.block_types.iter().find(|t| t.as_str() != expected) {
        return Err(Error::UnknownName {
            kind: "VAE block type",
            name: other.clone(),
            expected: expected.to_string(),
        });
    }
    Ok(())
}

fn mid_block(vb: VarBuilder, config: &VaeCoderConfig) -> Result<UNetMidBlock2D> {
    let channels = config.block_out_channels[config.block_out_channels.len() - 1];
    let mc = MidBlockConfig {
        in_channels: channels,
        num_layers: 1,
        resnet: settings(config),
    };
    UNetMidBlock2D::new(vb, &mc, config.mid_block_add_attention, Some(channels))
}

/// diffusers' `Encoder` (`encoder` of an `AutoencoderKL`).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, config: &VaeCoderConfig) -> Result<Self> {
        check_blocks(config, "DownEncoderBlock2D")?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let conv_in = conv2d(config.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?;
        let vbd = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = out;
            let bc = DownBlockConfig {
                in_channels: input_channel,
                out_channels: output_channel,
                num_layers: config.layers_per_block,
                resnet: settings(config),
                add_downsample: i + 1 != n,
                downsample_padding: 0,
            };
            down_blocks.push(DownEncoderBlock2D::new(vbd.pp(i), &bc)?);
        }
        let last = boc[n - 1];
        let out = if config.double_z {
            2 * config.out_channels
        } else {
            config.out_channels
        };
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: mid_block(vb.pp("mid_block"), config)?,
            conv_norm_out: group_norm(config.norm_num_groups, last, 1e-6, vb.pp("conv_norm_out"))?,
            // diffusers hard-codes SiLU here whatever `act_fn` says.
            conv_act: Activation::Silu,
            conv_out: conv2d(last, out, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`
    /// - returns `[B, 2*out_channels (double_z) or out_channels, H/f, W/f]`
    ///   with `f = 2^(blocks-1)` (rounded down for odd sizes)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        xs = self.mid_block.forward(&xs, None)?;
        let xs = crate::models::resnet::norm_act(&self.conv_norm_out, &self.conv_act, &xs)?;
        self.conv_out.forward(&xs)
    }
}

/// diffusers' `Decoder` (`decoder` of an `AutoencoderKL`, group-norm variant).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, config: &VaeCoderConfig) -> Result<Self> {
        check_blocks(config, "UpDecoderBlock2D")?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let conv_in = conv2d(config.in_channels, rev[0], 3, 1, 1, vb.pp("conv_in"))?;
        let mid_block = mid_block(vb.pp("mid_block"), config)?;
        let vbu = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = rev[0];
        for (i, &out) in rev.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = out;
            let bc = UpBlockConfig {
                in_channels: prev_output_channel,
                prev_output_channel,
                out_channels: output_channel,
                num_layers: config.layers_per_block + 1,
                resnet: settings(config),
                add_upsample: i + 1 != n,
            };
            up_blocks.push(UpDecoderBlock2D::new(vbu.pp(i), &bc)?);
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                config.norm_num_groups,
                boc[0],
                1e-6,
                vb.pp("conv_norm_out"),
            )?,
            conv_act: Activation::Silu,
            conv_out: conv2d(boc[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// # Shapes
    /// - `z`: `[B, in_channels, h, w]`
    /// - returns `[B, out_channels, h*f, w*f]` with `f = 2^(blocks-1)`
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(z)?;
        xs = self.mid_block.forward(&xs, None)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = crate::models::resnet::norm_act(&self.conv_norm_out, &self.conv_act, &xs)?;
        self.conv_out.forward(&xs)
    }
}

//! The unconditional / class-conditional pixel-space denoising UNet of DDPM.
//!
//! Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020,
//! arXiv:2006.11239 (architecture after Ronneberger et al., arXiv:1505.04597,
//! with the wide-ResNet / self-attention blocks of the DDPM paper).
//!
//! Reference implementation: `diffusers.models.unets.unet_2d.UNet2DModel`.
//! Supported: positional time embeddings, class conditioning through an
//! embedding table (`num_class_embeds`), `"timestep"` or `"identity"`, the
//! `DownBlock2D`, `AttnDownBlock2D`, `UpBlock2D`, `AttnUpBlock2D` blocks and
//! the `UNetMidBlock2D` mid block. Other variants are refused at construction.
//!
//! Only differentiable candle ops are used, so the model can be trained with
//! candle's autograd (`Var`s from a `VarMap`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::ops::conv::Conv2d;
use crate::ops::group_norm::GroupNorm;
use serde::{Deserialize, Serialize};

use super::config_defaults::{
    d_1, d_3, d_32, d_default, d_norm_eps, d_one_f, d_positional, d_silu, d_true,
};
use crate::models::attention::{Attention, AttentionConfig};
use crate::models::downsampling::Downsample2D;
use crate::models::embeddings::{TimestepEmbedding, Timesteps};
use crate::models::resnet::{
    conv2d, group_norm, Activation, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm,
};
use crate::models::unet_2d_blocks::{
    DownBlock2D, DownBlockConfig, MidBlockConfig, ResnetSettings, UNetMidBlock2D, UpBlock2D,
    UpBlockConfig,
};
use crate::models::upsampling::Upsample2D;
use crate::{Error, Result};

fn config_error(message: impl Into<String>) -> Error {
    Error::Config {
        path: PathBuf::from("UNet2DConfig"),
        message: message.into(),
    }
}

fn d_2() -> usize {
    2
}
fn d_conv() -> String {
    "conv".to_string()
}
fn d_mid_block() -> Option<String> {
    Some("UNetMidBlock2D".to_string())
}
fn d_head_dim() -> Option<usize> {
    Some(8)
}
fn d_down_blocks() -> Vec<String> {
    let mut v = vec!["DownBlock2D".to_string()];
    v.extend(vec!["AttnDownBlock2D".to_string(); 3]);
    v
}
fn d_up_blocks() -> Vec<String> {
    let mut v = vec!["AttnUpBlock2D".to_string(); 3];
    v.push("UpBlock2D".to_string());
    v
}
fn d_block_out() -> Vec<usize> {
    vec![224, 448, 672, 896]
}

/// `config.json` of a diffusers `UNet2DModel`: keys and defaults as in
/// diffusers 0.42. Unknown keys are ignored; keys of features we do not
/// implement are kept so construction can refuse them clearly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConfig {
    /// Square side or (height, width); informative only.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    /// Map the input from [0, 1] to [-1, 1] first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Only `"positional"` is supported.
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    /// Defaults to `4 * block_out_channels[0]`.
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default = "d_down_blocks")]
    pub down_block_types: Vec<String>,
    /// `"UNetMidBlock2D"` or null (no mid block).
    #[serde(default = "d_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_2")]
    pub layers_per_block: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    /// Only `"conv"` is supported.
    #[serde(default = "d_conv")]
    pub downsample_type: String,
    /// Only `"conv"` is supported.
    #[serde(default = "d_conv")]
    pub upsample_type: String,
    /// Training-time only; ignored (no dropout in this implementation).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    /// Width of each attention head; null means one head per block.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: Option<usize>,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    /// Groups of the mid-block attention norm; only the default (null) is
    /// supported.
    #[serde(default)]
    pub attn_norm_num_groups: Option<usize>,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// `"default"` or `"scale_shift"`.
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    /// Self-attention in the mid block.
    #[serde(default = "d_true")]
    pub add_attention: bool,
    /// null (embedding table when `num_class_embeds` is set), `"timestep"`
    /// or `"identity"`.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Only used by learned time embeddings (unsupported); ignored.
    #[serde(default)]
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNet2DConfig {
    /// diffusers' defaults.
    fn default() -> Self {
        // An empty JSON object takes every serde default.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

impl UNet2DConfig {
    /// Reads and parses a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The class-conditional DDPM UNet on 28x28 single-channel images (MNIST
    /// sized) of the "CPU speed" issue: two resolutions of 32 and 64
    /// channels, 10 classes, about 0.92M parameters.
    pub fn ddpm_mnist_class_conditional() -> Self {
        Self {
            sample_size: Some(serde_json::Value::from(28)),
            in_channels: 1,
            out_channels: 1,
            layers_per_block: 2,
            block_out_channels: vec![32, 64],
            down_block_types: vec!["DownBlock2D".to_string(); 2],
            up_block_types: vec!["UpBlock2D".to_string(); 2],
            norm_num_groups: 8,
            num_class_embeds: Some(10),
            ..Self::default()
        }
    }

    /// `sample_size` as (height, width), when the config gives it.
    pub fn sample_hw(&self) -> Option<(usize, usize)> {
        match self.sample_size.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64().map(|v| (v as usize, v as usize)),
            serde_json::Value::Array(a) if a.len() == 2 => {
                Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize))
            }
            _ => None,
        }
    }

    /// Width of the time (and class) embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    fn check_supported(&self) -> Result<()> {
        let n = self.down_block_types.len();
        if n == 0 {
            return Err(config_error("`down_block_types` is empty"));
        }
        if self.up_block_types.len() != n {
            return Err(config_error(format!(
                "{} down blocks but {} up blocks",
                n,
                self.up_block_types.len()
            )));
        }
        if self.block_out_channels.len() != n {
            return Err(config_error(format!(
                "{} block_out_channels for {} down blocks",
                self.block_out_channels.len(),
                n
            )));
        }
        if self.block_out_channels.contains(&0) {
            return Err(config_error("`block_out_channels` contains 0"));
        }
        if self.layers_per_block == 0 {
            return Err(config_error("`layers_per_block` must be at least 1"));
        }
        if self.time_embedding_type != "positional" {
            return Err(config_error(format!(
                "`time_embedding_type` = {:?} is not supported (only \"positional\")",
                self.time_embedding_type
            )));
        }
        for (key, value) in [
            ("downsample_type", &self.downsample_type),
            ("upsample_type", &self.upsample_type),
        ] {
            if value != "conv" {
                return Err(config_error(format!(
                    "`{key}` = {value:?} is not supported (only \"conv\")"
                )));
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2D") => {}
            Some(other) => {
                return Err(config_error(format!(
                "`mid_block_type` = {other:?} is not supported (only \"UNetMidBlock2D\" or null)"
            )))
            }
        }
        if let Some(g) = self.attn_norm_num_groups {
            return Err(config_error(format!(
                "`attn_norm_num_groups` = {g} is not supported (only null)"
            )));
        }
        match self.class_embed_type.as_deref() {
            None | Some("timestep") | Some("identity") => {}
            Some(other) => {
                return Err(config_error(format!(
                    "`class_embed_type` = {other:?} is not supported (null, \"timestep\" or \"identity\")"
                )))
            }
        }
        if self.num_class_embeds == Some(0) && self.class_embed_type.is_none() {
            return Err(config_error("`num_class_embeds` is 0"));
        }
        Ok(())
    }
}

/// The class conditioning added to the time embedding.
#[derive(Debug, Clone)]
enum ClassEmbedding {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)`: integer labels.
    Table(Embedding),
    /// The sinusoidal projection then a `TimestepEmbedding`: numeric labels.
    Timestep(TimestepEmbedding),
    /// The labels are the embedding (`[B, time_embed_dim]`).
    Identity,
}

/// The settings of a self-attention block of the pixel-space UNet: a group
/// norm, multi-head attention over the `H*W` positions, and a residual.
fn spatial_attention(
    channels: usize,
    head_dim: Option<usize>,
    resnet: &ResnetSettings,
    norm_groups: Option<usize>,
) -> Result<AttentionConfig> {
    let head_dim = head_dim.unwrap_or(channels);
    if head_dim == 0 || !channels.is_multiple_of(head_dim) {
        return Err(config_error(format!(
            "{channels} channels cannot be split into attention heads of width {head_dim}"
        )));
    }
    Ok(AttentionConfig {
        bias: true,
        upcast_attention: true,
        norm_num_groups: norm_groups,
        eps: resnet.eps,
        residual_connection: true,
        rescale_output_factor: resnet.output_scale_factor,
        ..AttentionConfig::new(channels, channels / head_dim, head_dim)
    })
}

fn resnet_block(s: &ResnetSettings, cin: usize, cout: usize) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig {
        in_channels: cin,
        out_channels: Some(cout),
        temb_channels: s.temb_channels,
        groups: s.groups,
        groups_out: None,
        eps: s.eps,
        non_linearity: s.act_fn,
        output_scale_factor: s.output_scale_factor,
        time_embedding_norm: s.time_scale_shift,
    }
}

/// diffusers' `AttnDownBlock2D`: (ResNet, spatial self-attention) pairs then
/// an optional downsampler.
#[derive(Debug, Clone)]
pub struct AttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    downsampler: Option<Downsample2D>,
}

impl AttnDownBlock2D {
    /// `attention_head_dim` defaults to `out_channels` (one head).
    pub fn new(
        vb: VarBuilder,
        config: &DownBlockConfig,
        attention_head_dim: Option<usize>,
    ) -> Result<Self> {
        let (i0, o) = (config.in_channels, config.out_channels);
        let acfg = spatial_attention(
            o,
            attention_head_dim,
            &config.resnet,
            Some(config.resnet.groups),
        )?;
        let (vbr, vba) = (vb.pp("resnets"), vb.pp("attentions"));
        let mut resnets = Vec::with_capacity(config.num_layers);
        let mut attentions = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let cin = if i == 0 { i0 } else { o };
            resnets.push(ResnetBlock2D::new(
                vbr.pp(i),
                &resnet_block(&config.resnet, cin, o),
            )?);
            attentions.push(Attention::new(vba.pp(i), &acfg)?);
        }
        let downsampler = if config.add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp("0"),
                o,
                true,
                Some(o),
                config.downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]`
    /// - returns `[B, out_channels, H', W']` (halved when downsampling) and
    ///   the skip states (one per resnet, plus the downsampled output)
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            xs = resnet.forward(&xs, temb)?;
            xs = attn.forward(&xs, None)?;
            states.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

/// diffusers' `AttnUpBlock2D`: (ResNet over the skip concatenation, spatial
/// self-attention) pairs then an optional upsampler.
#[derive(Debug, Clone)]
pub struct AttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    upsampler: Option<Upsample2D>,
}

impl AttnUpBlock2D {
    /// `attention_head_dim` defaults to `out_channels` (one head).
    pub fn new(
        vb: VarBuilder,
        config: &UpBlockConfig,
        attention_head_dim: Option<usize>,
    ) -> Result<Self> {
        let o = config.out_channels;
        let acfg = spatial_attention(
            o,
            attention_head_dim,
            &config.resnet,
            Some(config.resnet.groups),
        )?;
        let (vbr, vba) = (vb.pp("resnets"), vb.pp("attentions"));
        let mut resnets = Vec::with_capacity(config.num_layers);
        let mut attentions = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let skip = if i + 1 == config.num_layers {
                config.in_channels
            } else {
                o
            };
            let input = if i == 0 {
                config.prev_output_channel
            } else {
                o
            };
            resnets.push(ResnetBlock2D::new(
                vbr.pp(i),
                &resnet_block(&config.resnet, input + skip, o),
            )?);
            attentions.push(Attention::new(vba.pp(i), &acfg)?);
        }
        let upsampler = if config.add_upsample {
            Some(Upsample2D::new(
                vb.pp("upsamplers").pp("0"),
                o,
                true,
                Some(o),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip connections the block consumes.
    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `res_hidden_states` are this block's skip connections in the order the
    /// down blocks produced them (the last is used first).
    ///
    /// # Shapes
    /// - `xs`: `[B, prev_output_channel, H, W]`, `temb`: `[B, temb_channels]`
    /// - returns `[B, out_channels, 2H, 2W]` (or `H, W` without upsampler)
    pub fn forward(
        &self,
        xs: &Tensor,
        res_hidden_states: &[Tensor],
        temb: Option<&Tensor>,
    ) -> Result<Tensor> {
        if res_hidden_states.len() != self.resnets.len() {
            return Err(Error::invalid(format!(
                "AttnUpBlock2D: expected {} skip connections, got {}",
                self.resnets.len(),
                res_hidden_states.len()
            )));
        }
        let mut xs = xs.clone();
        for ((resnet, attn), skip) in self
            .resnets
            .iter()
            .zip(&self.attentions)
            .zip(res_hidden_states.iter().rev())
        {
            xs = Tensor::cat(&[&xs, skip], 1)?;
            xs = resnet.forward(&xs, temb)?;
            xs = attn.forward(&xs, None)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

#[derive(Debug, Clone)]
enum DownBlock {
    Plain(DownBlock2D),
    Attn(AttnDownBlock2D),
}

#[derive(Debug, Clone)]
enum UpBlock {
    Plain(UpBlock2D),
    Attn(AttnUpBlock2D),
}

impl UpBlock {
    fn num_resnets(&self) -> usize {
        match self {
            Self::Plain(b) => b.num_resnets(),
            Self::Attn(b) => b.num_resnets(),
        }
    }
}

/// diffusers' `UNet2DModel`.
#[derive(Debug, Clone)]
pub struct UNet2DModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<ClassEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<UNetMidBlock2D>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    config: UNet2DConfig,
}

impl UNet2DModel {
    pub fn new(vb: VarBuilder, config: &UNet2DConfig) -> Result<Self> {
        config.check_supported()?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let c0 = boc[0];
        let act = Activation::from_name(&config.act_fn)?;
        let tss = TimeEmbeddingNorm::from_name(&config.resnet_time_scale_shift)?;
        let groups = config.norm_num_groups;
        let time_embed_dim = config.time_embed_dim();

        let conv_in = conv2d(config.in_channels, c0, 3, 1, 1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(c0, config.flip_sin_to_cos, config.freq_shift);
        // diffusers builds the time (and class) MLPs with their default SiLU,
        // whatever `act_fn` says.
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            c0,
            time_embed_dim,
            Activation::Silu,
        )?;
        let class_embedding = match (config.class_embed_type.as_deref(), config.num_class_embeds) {
            (None, Some(k)) => Some(ClassEmbedding::Table(candle_nn::embedding(
                k,
                time_embed_dim,
                vb.pp("class_embedding"),
            )?)),
            (Some("timestep"), _) => Some(ClassEmbedding::Timestep(TimestepEmbedding::new(
                vb.pp("class_embedding"),
                c0,
                time_embed_dim,
                Activation::Silu,
            )?)),
            (Some("identity"), _) => Some(ClassEmbedding::Identity),
            _ => None,
        };

        let resnet = |output_scale_factor: f64| ResnetSettings {
            temb_channels: Some(time_embed_dim),
            eps: config.norm_eps,
            act_fn: act,
            groups,
            time_scale_shift: tss,
            output_scale_factor,
        };

        let vb_down = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = c0;
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = boc[i];
            let bc = DownBlockConfig {
                in_channels: input_channel,
                out_channels: output_channel,
                num_layers: config.layers_per_block,
                resnet: resnet(1.0),
                add_downsample: i + 1 != n,
                downsample_padding: config.downsample_padding,
            };
            down_blocks.push(match kind.as_str() {
                "DownBlock2D" => DownBlock::Plain(DownBlock2D::new(vb_down.pp(i), &bc)?),
                "AttnDownBlock2D" => DownBlock::Attn(AttnDownBlock2D::new(
                    vb_down.pp(i),
                    &bc,
                    config.attention_head_dim,
                )?),
                other => {
                    return Err(config_error(format!(
                        "down block type {other:?} is not supported (DownBlock2D, AttnDownBlock2D)"
                    )))
                }
            });
        }

        let c_last = boc[n - 1];
        let mid_block = match config.mid_block_type {
            None => None,
            Some(_) => Some(UNetMidBlock2D::new(
                vb.pp("mid_block"),
                &MidBlockConfig {
                    in_channels: c_last,
                    num_layers: 1,
                    resnet: resnet(config.mid_block_scale_factor),
                },
                config.add_attention,
                Some(config.attention_head_dim.unwrap_or(c_last)),
            )?),
        };

        let vb_up = vb.pp("up_blocks");
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = rev[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = rev[i];
            let bc = UpBlockConfig {
                in_channels: rev[(i + 1).min(n - 1)],
                prev_output_channel,
                out_channels: output_channel,
                num_layers: config.layers_per_block + 1,
                resnet: resnet(1.0),
                add_upsample: i + 1 != n,
            };
            up_blocks.push(match kind.as_str() {
                "UpBlock2D" => UpBlock::Plain(UpBlock2D::new(vb_up.pp(i), &bc)?),
                "AttnUpBlock2D" => UpBlock::Attn(AttnUpBlock2D::new(
                    vb_up.pp(i),
                    &bc,
                    config.attention_head_dim,
                )?),
                other => {
                    return Err(config_error(format!(
                        "up block type {other:?} is not supported (UpBlock2D, AttnUpBlock2D)"
                    )))
                }
            });
        }

        let conv_norm_out = group_norm(groups, c0, config.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(c0, config.out_channels, 3, 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: Activation::Silu,
            conv_out,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConfig {
        &self.config
    }

    /// Predicts the noise (or whatever the model was trained on) for
    /// `sample` at `timesteps`, conditioned on `class_labels` when the model
    /// is class-conditional.
    ///
    /// # Shapes
    /// - `sample`: `[B, in_channels, H, W]`, H and W divisible by
    ///   `2^(number of down blocks - 1)`
    /// - `timesteps`: a scalar, `[1]` or `[B]` (any numeric dtype; fractional
    ///   values allowed); the sinusoidal embedding is computed in f32
    /// - `class_labels`: required iff the config has class conditioning:
    ///   `[B]` integer (u8/u32/i64) labels for an embedding table, `[B]`
    ///   numbers for `"timestep"`, `[B, time_embed_dim]` for `"identity"`
    /// - returns `[B, out_channels, H, W]` in the dtype of `sample`
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let shape_err = || Error::Shape {
            what: "UNet2DModel sample".to_string(),
            expected: format!("[B, {}, H, W]", self.config.in_channels),
            got: format!("{:?}", sample.dims()),
        };
        let (b, c, _, _) = sample.dims4().map_err(|_| shape_err())?;
        if c != self.config.in_channels {
            return Err(shape_err());
        }
        let timesteps = match timesteps.dims() {
            [] => timesteps.reshape(1)?.repeat(b)?,
            [1] => timesteps.repeat(b)?,
            [n] if *n == b => timesteps.clone(),
            other => {
                return Err(Error::Shape {
                    what: "timesteps".to_string(),
                    expected: format!("[] or [1] or [{b}]"),
                    got: format!("{other:?}"),
                })
            }
        };
        let dtype = sample.dtype();
        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };

        let t_emb = self.time_proj.forward(&timesteps)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        match (&self.class_embedding, class_labels) {
            (Some(ce), Some(labels)) => {
                let class_emb = self.class_embedding(ce, labels, b)?.to_dtype(dtype)?;
                emb = (emb + class_emb)?;
            }
            (Some(_), None) => {
                return Err(Error::invalid(
                    "UNet2DModel: this model is class-conditional, class_labels must be given",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "UNet2DModel: this model has no class embedding, class_labels must be None",
                ))
            }
            (None, None) => {}
        }
        let emb = Some(&emb);

        let mut xs = self.conv_in.forward(&sample)?;
        let mut res_samples = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, states) = match block {
                DownBlock::Plain(b) => b.forward(&xs, emb)?,
                DownBlock::Attn(b) => b.forward(&xs, emb)?,
            };
            xs = out;
            res_samples.extend(states);
        }
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, emb)?;
        }
        for block in &self.up_blocks {
            let split = res_samples
                .len()
                .checked_sub(block.num_resnets())
                .ok_or_else(|| {
                    Error::invalid("UNet2DModel: up blocks need more skip connections than made")
                })?;
            let skips = res_samples.split_off(split);
            xs = match block {
                UpBlock::Plain(b) => b.forward(&xs, &skips, emb, None)?,
                UpBlock::Attn(b) => b.forward(&xs, &skips, emb)?,
            };
        }
        let xs = crate::models::resnet::norm_act(&self.conv_norm_out, &self.conv_act, &xs)?;
        self.conv_out.forward(&xs)
    }

    fn class_embedding(&self, ce: &ClassEmbedding, labels: &Tensor, b: usize) -> Result<Tensor> {
        let d = self.config.time_embed_dim();
        let bad = |expected: String| Error::Shape {
            what: "class_labels".to_string(),
            expected,
            got: format!("{:?} {:?}", labels.dims(), labels.dtype()),
        };
        match ce {
            ClassEmbedding::Table(table) => {
                if labels.dims() != [b] || labels.dtype().is_float() {
                    return Err(bad(format!("[{b}] integer labels")));
                }
                let labels = labels.to_dtype(DType::U32)?;
                let max = labels.max(0)?.to_scalar::<u32>()? as usize;
                let k = self.config.num_class_embeds.unwrap_or(0);
                if max >= k {
                    return Err(Error::invalid(format!(
                        "UNet2DModel: class label {max} out of range (num_class_embeds = {k})"
                    )));
                }
                Ok(table.forward(&labels)?)
            }
            ClassEmbedding::Timestep(proj) => {
                if labels.dims() != [b] {
                    return Err(bad(format!("[{b}]")));
                }
                let t = self.time_proj.forward(labels)?;
                proj.forward(&t.to_dtype(self.time_dtype())?)
            }
            ClassEmbedding::Identity => {
                if labels.dims() != [b, d] {
                    return Err(bad(format!("[{b}, {d}]")));
                }
                Ok(labels.clone())
            }
        }
    }

    fn time_dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }
}

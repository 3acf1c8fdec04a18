//! The text-conditioned denoising UNet of Stable Diffusion.
//!
//! Rombach, Blattmann, Lorenz, Esser, Ommer, "High-Resolution Image Synthesis
//! with Latent Diffusion Models", 2021, arXiv:2112.10752 (architecture after
//! Ronneberger et al., arXiv:1505.04597, and Ho et al., arXiv:2006.11239).
//!
//! Reference implementation:
//! `diffusers.models.unets.unet_2d_condition.UNet2DConditionModel`.
//! Supported: positional time embeddings, the `CrossAttnDownBlock2D`,
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` and
//! `UpBlock2D` blocks (SD 1.x and 2.x), and the `"projection"` class
//! embedding of Stable unCLIP (a vector per sample added to the time
//! embedding). Other class embeddings, added embeddings (SDXL), encoder
//! projections and other block types are refused at construction.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ops::conv::Conv2d;
use crate::ops::group_norm::GroupNorm;
use serde::{Deserialize, Serialize};

use super::config_defaults::{
    d_1, d_3, d_4, d_64, d_default, d_norm_eps, d_one_f, d_positional, d_silu, d_true,
};
use crate::models::embeddings::{TimestepEmbedding, Timesteps};
use crate::models::resnet::{conv2d, group_norm, Activation, TimeEmbeddingNorm};
use crate::models::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnSettings, CrossAttnUpBlock2D, DownBlock2D, DownBlockConfig,
    MidBlockConfig, ResnetSettings, UNetMidBlock2DCrossAttn, UpBlock2D, UpBlockConfig,
};
use crate::{Error, Result};

/// A config value given either once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// One value per block for `n` blocks.
    pub fn per_block(&self, n: usize, key: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => Err(config_error(format!(
                "`{key}` has {} entries but there are {n} down blocks",
                v.len()
            ))),
        }
    }
}

fn config_error(message: impl Into<String>) -> Error {
    Error::Config {
        path: PathBuf::from("UNet2DConditionConfig"),
        message: message.into(),
    }
}

fn sd_down_blocks() -> Vec<String> {
    let mut v = vec!["CrossAttnDownBlock2D".to_string(); 3];
    v.push("DownBlock2D".to_string());
    v
}
fn sd_up_blocks() -> Vec<String> {
    let mut v = vec!["UpBlock2D".to_string()];
    v.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    v
}
fn d_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one_layer() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_head_dim() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_false_many() -> OneOrMany<bool> {
    OneOrMany::One(false)
}

/// `unet/config.json` of a diffusers `UNet2DConditionModel`: keys and
/// defaults as in diffusers 0.42. Unknown keys are ignored; keys for features
/// we do not implement are kept so construction can refuse them clearly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<OneOrMany<usize>>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "sd_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "sd_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_many")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_one_layer")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name this is the number of heads for SD 1.x/2.x (diffusers'
    /// naming quirk, see [`UNet2DConditionConfig::num_heads_per_block`]).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "d_64")]
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNet2DConditionConfig {
    /// diffusers' defaults (an SD 1.x-shaped UNet with cross_attention_dim 1280).
    fn default() -> Self {
        // An empty JSON object takes every serde default.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

impl UNet2DConditionConfig {
    /// Reads and parses `unet/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::io::model_folder::read_json(path.as_ref())
    }

    /// The UNet of Stable Diffusion 1.5: `unet/config.json` of the Hugging
    /// Face repository `stable-diffusion-v1-5/stable-diffusion-v1-5`
    /// (formerly `runwayml/stable-diffusion-v1-5`).
    pub fn stable_diffusion_v1_5() -> Self {
        Self {
            sample_size: Some(OneOrMany::One(64)),
            cross_attention_dim: OneOrMany::One(768),
            ..Self::default()
        }
    }

    /// The UNet of Stable Diffusion 2.1 (768-v): `unet/config.json` of the
    /// Hugging Face repository `stabilityai/stable-diffusion-2-1`.
    pub fn stable_diffusion_v2_1() -> Self {
        Self {
            sample_size: Some(OneOrMany::One(96)),
            cross_attention_dim: OneOrMany::One(1024),
            attention_head_dim: OneOrMany::Many(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// Number of attention heads of each down block.
    ///
    /// diffusers reads `num_attention_heads = num_attention_heads or
    /// attention_head_dim`: for these UNets `attention_head_dim` is really
    /// the head count and each head is `channels / heads` wide. diffusers 0.42
    /// refuses an explicit `num_attention_heads`, and so do we.
    pub fn num_heads_per_block(&self) -> Result<Vec<usize>> {
        if self.num_attention_heads.is_some() {
            return Err(config_error(
                "`num_attention_heads` cannot be set (diffusers' naming issue #2011); \
                 give the head count as `attention_head_dim`",
            ));
        }
        self.attention_head_dim
            .per_block(self.down_block_types.len(), "attention_head_dim")
    }

    /// Refuses the features this implementation does not have.
    fn check_supported(&self) -> Result<()> {
        let unsupported = |key: &str, value: String| {
            Err(config_error(format!(
                "`{key}` = {value} is not supported (Stable Diffusion 1.x/2.x UNets only)"
            )))
        };
        if let Some(v) = &self.addition_embed_type {
            return unsupported("addition_embed_type", format!("{v:?}"));
        }
        match (
            self.class_embed_type.as_deref(),
            self.projection_class_embeddings_input_dim,
        ) {
            (None, _) => {}
            (Some("projection"), Some(d)) if d > 0 => {}
            (Some("projection"), _) => return Err(config_error(
                "`class_embed_type` \"projection\" needs `projection_class_embeddings_input_dim`",
            )),
            (Some(v), _) => return unsupported("class_embed_type", format!("{v:?}")),
        }
        if let Some(v) = self.num_class_embeds {
            return unsupported("num_class_embeds", v.to_string());
        }
        if let Some(v) = self.encoder_hid_dim {
            return unsupported("encoder_hid_dim", v.to_string());
        }
        if let Some(v) = &self.encoder_hid_dim_type {
            return unsupported("encoder_hid_dim_type", format!("{v:?}"));
        }
        if let Some(v) = self.time_cond_proj_dim {
            return unsupported("time_cond_proj_dim", v.to_string());
        }
        if let Some(v) = &self.timestep_post_act {
            return unsupported("timestep_post_act", format!("{v:?}"));
        }
        if self.time_embedding_type != "positional" {
            return unsupported(
                "time_embedding_type",
                format!("{:?}", self.time_embedding_type),
            );
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", format!("{:?}", self.attention_type));
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", "true".into());
        }
        if self.class_embeddings_concat {
            return unsupported("class_embeddings_concat", "true".into());
        }
        if self.norm_num_groups.is_none() {
            return unsupported("norm_num_groups", "null".into());
        }
        let n = self.down_block_types.len();
        if n == 0 {
            return Err(config_error("`down_block_types` is empty"));
        }
        if self.block_out_channels.len() != n {
            return Err(config_error(format!(
                "`block_out_channels` has {} entries but `down_block_types` has {n}",
                self.block_out_channels.len()
            )));
        }
        if self.up_block_types.len() != n {
            return Err(config_error(format!(
                "`up_block_types` has {} entries but `down_block_types` has {n}",
                self.up_block_types.len()
            )));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err(config_error(
                "`conv_in_kernel` and `conv_out_kernel` must be odd",
            ));
        }
        Ok(())
    }
}

fn unknown_block(kind: &'static str, name: &str, expected: &str) -> Error {
    Error::UnknownName {
        kind,
        name: name.to_string(),
        expected: expected.to_string(),
    }
}

#[derive(Debug, Clone)]
enum DownBlock {
    CrossAttn(CrossAttnDownBlock2D),
    Plain(DownBlock2D),
}

#[derive(Debug, Clone)]
enum UpBlock {
    CrossAttn(CrossAttnUpBlock2D),
    Plain(UpBlock2D),
}

impl UpBlock {
    fn num_resnets(&self) -> usize {
        match self {
            Self::CrossAttn(b) => b.num_resnets(),
            Self::Plain(b) => b.num_resnets(),
        }
    }
}

/// diffusers' `UNet2DConditionModel` (SD 1.x / 2.x).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    time_embed_act: Option<Activation>,
    /// `class_embed_type: "projection"`: a vector per sample (Stable
    /// unCLIP's image embedding; ensueno's own model's sentence embedding)
    /// projected and added to the time embedding.
    class_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<UNetMidBlock2DCrossAttn>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    config: UNet2DConditionConfig,
    /// The conditioning widths the cross-attention blocks expect.
    cross_attention_dims: Vec<usize>,
    num_upsamplers: usize,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNet2DConditionConfig) -> Result<Self> {
        config.check_supported()?;
        let n = config.down_block_types.len();
        let boc = &config.block_out_channels;
        let groups = config.norm_num_groups.unwrap_or(32);
        let act = Activation::from_name(&config.act_fn)?;
        let tss = TimeEmbeddingNorm::from_name(&config.resnet_time_scale_shift)?;
        let heads = config.num_heads_per_block()?;
        let cross = config
            .cross_attention_dim
            .per_block(n, "cross_attention_dim")?;
        let layers = config.layers_per_block.per_block(n, "layers_per_block")?;
        let tlayers = config
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let only_cross = config
            .only_cross_attention
            .per_block(n, "only_cross_attention")?;
        let mid_only_cross =
            config
                .mid_block_only_cross_attention
                .unwrap_or(match config.only_cross_attention {
                    OneOrMany::One(b) => b,
                    OneOrMany::Many(_) => false,
                });

        let c0 = boc[0];
        let conv_in = conv2d(
            config.in_channels,
            c0,
            config.conv_in_kernel,
            1,
            (config.conv_in_kernel - 1) / 2,
            vb.pp("conv_in"),
        )?;
        let time_embed_dim = config.time_embedding_dim.unwrap_or(4 * c0);
        let time_proj = Timesteps::new(c0, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), c0, time_embed_dim, act)?;
        let time_embed_act = config
            .time_embedding_act_fn
            .as_deref()
            .map(Activation::from_name)
            .transpose()?;
        // diffusers builds this projection with its default SiLU, whatever `act_fn` says.
        let class_embedding = match config.projection_class_embeddings_input_dim {
            Some(d) if config.class_embed_type.is_some() => Some(TimestepEmbedding::new(
                vb.pp("class_embedding"),
                d,
                time_embed_dim,
                Activation::Silu,
            )?),
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
        let attn = |i: usize, tl: usize, only: bool| CrossAttnSettings {
            transformer_layers_per_block: tl,
            num_attention_heads: heads[i],
            cross_attention_dim: cross[i],
            use_linear_projection: config.use_linear_projection,
            only_cross_attention: only,
            upcast_attention: config.upcast_attention,
        };
        let mut cross_attention_dims = Vec::new();

        let vb_down = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = c0;
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = boc[i];
            let bc = DownBlockConfig {
                in_channels: input_channel,
                out_channels: output_channel,
                num_layers: layers[i],
                resnet: resnet(1.0),
                add_downsample: i + 1 != n,
                downsample_padding: config.downsample_padding,
            };
            let kind = kind.strip_prefix("UNetRes").unwrap_or(kind);
            down_blocks.push(match kind {
                "CrossAttnDownBlock2D" => {
                    cross_attention_dims.push(cross[i]);
                    DownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                        vb_down.pp(i),
                        &bc,
                        &attn(i, tlayers[i], only_cross[i]),
                    )?)
                }
                "DownBlock2D" => DownBlock::Plain(DownBlock2D::new(vb_down.pp(i), &bc)?),
                other => {
                    return Err(unknown_block(
                        "down block type",
                        other,
                        "CrossAttnDownBlock2D, DownBlock2D",
                    ))
                }
            });
        }

        let c_last = boc[n - 1];
        let mid_block = match config.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {
                cross_attention_dims.push(cross[n - 1]);
                let mc = MidBlockConfig {
                    in_channels: c_last,
                    num_layers: 1,
                    resnet: resnet(config.mid_block_scale_factor),
                };
                Some(UNetMidBlock2DCrossAttn::new(
                    vb.pp("mid_block"),
                    &mc,
                    &attn(n - 1, tlayers[n - 1], mid_only_cross),
                )?)
            }
            None => None,
            Some(other) => {
                return Err(unknown_block(
                    "mid block type",
                    other,
                    "UNetMidBlock2DCrossAttn, null",
                ))
            }
        };

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let r_boc = rev(boc);
        let r_heads = rev(&heads);
        let r_layers = rev(&layers);
        let r_cross = rev(&cross);
        let r_tlayers = match &config.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(config_error(format!(
                "`reverse_transformer_layers_per_block` has {} entries but there are {n} up blocks",
                v.len()
            )))
            }
            None => rev(&tlayers),
        };
        let r_only: Vec<bool> = only_cross.iter().rev().copied().collect();
        let vb_up = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut num_upsamplers = 0;
        let mut output_channel = r_boc[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let is_final = i + 1 == n;
            let prev_output_channel = output_channel;
            output_channel = r_boc[i];
            let input_channel = r_boc[(i + 1).min(n - 1)];
            if !is_final {
                num_upsamplers += 1;
            }
            let bc = UpBlockConfig {
                in_channels: input_channel,
                prev_output_channel,
                out_channels: output_channel,
                num_layers: r_layers[i] + 1,
                resnet: resnet(1.0),
                add_upsample: !is_final,
            };
            let kind = kind.strip_prefix("UNetRes").unwrap_or(kind);
            up_blocks.push(match kind {
                "CrossAttnUpBlock2D" => {
                    cross_attention_dims.push(r_cross[i]);
                    let settings = CrossAttnSettings {
                        transformer_layers_per_block: r_tlayers[i],
                        num_attention_heads: r_heads[i],
                        cross_attention_dim: r_cross[i],
                        use_linear_projection: config.use_linear_projection,
                        only_cross_attention: r_only[i],
                        upcast_attention: config.upcast_attention,
                    };
                    UpBlock::CrossAttn(CrossAttnUpBlock2D::new(vb_up.pp(i), &bc, &settings)?)
                }
                "UpBlock2D" => UpBlock::Plain(UpBlock2D::new(vb_up.pp(i), &bc)?),
                other => {
                    return Err(unknown_block(
                        "up block type",
                        other,
                        "CrossAttnUpBlock2D, UpBlock2D",
                    ))
                }
            });
        }

        let conv_norm_out = group_norm(groups, c0, config.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(
            c0,
            config.out_channels,
            config.conv_out_kernel,
            1,
            (config.conv_out_kernel - 1) / 2,
            vb.pp("conv_out"),
        )?;
        cross_attention_dims.sort_unstable();
        cross_attention_dims.dedup();
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            time_embed_act,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: act,
            conv_out,
            config: config.clone(),
            cross_attention_dims,
            num_upsamplers,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Predicts the noise (or v / sample, per the checkpoint's training) for
    /// `sample` at `timesteps` conditioned on `encoder_hidden_states`.
    ///
    /// Any height and width are accepted: when they are not multiples of
    /// `2^(number of upsamplers)` the upsamplers are given the skip
    /// connections' sizes, as diffusers does.
    ///
    /// # Shapes
    /// - `sample`: `[B, in_channels, H, W]`
    /// - `timesteps`: a scalar, `[1]` or `[B]`; f32 or f64 (fractional
    ///   values allowed); the embedding is computed in f32
    /// - `encoder_hidden_states`: `[B, T, cross_attention_dim]`
    /// - returns `[B, out_channels, H, W]` in the dtype of `sample`
    ///
    /// A UNet with a class embedding refuses this: use
    /// [`Self::forward_with_class_labels`].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with_class_labels(sample, timesteps, encoder_hidden_states, None)
    }

    /// The width of the class labels this UNet needs (`class_embed_type:
    /// "projection"`), or `None` when it takes none.
    pub fn class_labels_dim(&self) -> Option<usize> {
        self.class_embedding
            .as_ref()
            .and(self.config.projection_class_embeddings_input_dim)
    }

    /// [`Self::forward`] with diffusers' `class_labels`, which a UNet with
    /// `class_embed_type: "projection"` needs and any other refuses.
    ///
    /// # Shapes
    /// As [`Self::forward`], and
    /// - `class_labels`: `[B, projection_class_embeddings_input_dim]`
    pub fn forward_with_class_labels(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = sample.dims4().map_err(|_| Error::Shape {
            what: "UNet sample".to_string(),
            expected: format!("[B, {}, H, W]", self.config.in_channels),
            got: format!("{:?}", sample.dims()),
        })?;
        if c != self.config.in_channels {
            return Err(Error::Shape {
                what: "UNet sample".to_string(),
                expected: format!("[B, {}, H, W]", self.config.in_channels),
                got: format!("{:?}", sample.dims()),
            });
        }
        let enc_dims = encoder_hidden_states.dims();
        let enc_ok = enc_dims.len() == 3
            && enc_dims[0] == b
            && self.cross_attention_dims.iter().all(|&d| d == enc_dims[2]);
        if !enc_ok {
            let width = match self.cross_attention_dims.as_slice() {
                [d] => d.to_string(),
                _ => "cross_attention_dim".to_string(),
            };
            return Err(Error::Shape {
                what: "encoder_hidden_states".to_string(),
                expected: format!("[{b}, T, {width}]"),
                got: format!("{enc_dims:?}"),
            });
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

        let up_factor = 1usize << self.num_upsamplers;
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;

        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let t_emb = self
            .time_proj
            .forward(&timesteps)?
            .to_dtype(sample.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        match (&self.class_embedding, class_labels) {
            (None, None) => {}
            (Some(proj), Some(labels)) => {
                let d = self.class_labels_dim().unwrap_or(0);
                if labels.dims() != [b, d] {
                    return Err(Error::Shape {
                        what: "class_labels".to_string(),
                        expected: format!("[{b}, {d}]"),
                        got: format!("{:?}", labels.dims()),
                    });
                }
                let class_emb = proj.forward(&labels.to_dtype(emb.dtype())?)?;
                emb = (emb + class_emb)?;
            }
            (Some(_), None) => {
                return Err(Error::invalid(
                    "this UNet has a class embedding (class_embed_type \"projection\"): it needs class_labels",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "class_labels given to a UNet without a class embedding",
                ))
            }
        }
        if let Some(act) = &self.time_embed_act {
            emb = emb.apply(act)?;
        }
        let emb = Some(&emb);
        let enc = Some(encoder_hidden_states);

        let mut xs = self.conv_in.forward(&sample)?;
        let mut res_samples = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, states) = match block {
                DownBlock::CrossAttn(b) => b.forward(&xs, emb, enc)?,
                DownBlock::Plain(b) => b.forward(&xs, emb)?,
            };
            xs = out;
            res_samples.extend(states);
        }
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, emb, enc)?;
        }
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let k = block.num_resnets();
            let split = res_samples.len().checked_sub(k).ok_or_else(|| {
                Error::invalid(
                    "UNet: up blocks need more skip connections than the down blocks made",
                )
            })?;
            let skips = res_samples.split_off(split);
            let upsample_size = match res_samples.last() {
                Some(t) if i + 1 != n_up && forward_upsample_size => {
                    let (_, _, sh, sw) = t.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            xs = match block {
                UpBlock::CrossAttn(b) => b.forward(&xs, &skips, emb, enc, upsample_size)?,
                UpBlock::Plain(b) => b.forward(&xs, &skips, emb, upsample_size)?,
            };
        }
        let xs = crate::models::resnet::norm_act(&self.conv_norm_out, &self.conv_act, &xs)?;
        self.conv_out.forward(&xs)
    }
}

//! The down, mid and up blocks the UNet and the VAE are assembled from:
//! stacks of ResNet blocks, optionally interleaved with spatial transformers,
//! ending in a down- or upsampler.
//!
//! Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical
//! Image Segmentation", 2015, arXiv:1505.04597; the cross-attention variants
//! follow Rombach et al., "High-Resolution Image Synthesis with Latent
//! Diffusion Models", 2021, arXiv:2112.10752.
//!
//! Reference implementation: `diffusers.models.unets.unet_2d_blocks`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::models::attention::{Attention, AttentionConfig};
use crate::models::downsampling::Downsample2D;
use crate::models::resnet::{Activation, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm};
use crate::models::transformer_2d::{Transformer2DModel, Transformer2DModelConfig};
use crate::models::upsampling::Upsample2D;
use crate::{Error, Result};

/// The ResNet settings every block shares.
#[derive(Debug, Clone, PartialEq)]
pub struct ResnetSettings {
    /// Width of the time embedding; `None` for the VAE.
    pub temb_channels: Option<usize>,
    pub eps: f64,
    pub act_fn: Activation,
    pub groups: usize,
    pub time_scale_shift: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

impl ResnetSettings {
    fn block(&self, in_channels: usize, out_channels: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels,
            out_channels: Some(out_channels),
            temb_channels: self.temb_channels,
            groups: self.groups,
            groups_out: None,
            eps: self.eps,
            non_linearity: self.act_fn,
            output_scale_factor: self.output_scale_factor,
            time_embedding_norm: self.time_scale_shift,
        }
    }
}

/// The cross-attention settings of the blocks with transformers.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossAttnSettings {
    pub transformer_layers_per_block: usize,
    pub num_attention_heads: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl CrossAttnSettings {
    fn transformer(&self, channels: usize, groups: usize) -> Result<Transformer2DModelConfig> {
        let heads = self.num_attention_heads;
        if heads == 0 || !channels.is_multiple_of(heads) {
            return Err(Error::invalid(format!(
                "{channels} channels cannot be split into {heads} attention heads"
            )));
        }
        Ok(Transformer2DModelConfig {
            num_attention_heads: heads,
            attention_head_dim: channels / heads,
            in_channels: channels,
            num_layers: self.transformer_layers_per_block,
            cross_attention_dim: Some(self.cross_attention_dim),
            norm_num_groups: groups,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: self.only_cross_attention,
            upcast_attention: self.upcast_attention,
        })
    }
}

/// Settings of the down blocks ([`DownBlock2D`], [`CrossAttnDownBlock2D`],
/// [`DownEncoderBlock2D`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DownBlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub resnet: ResnetSettings,
    pub add_downsample: bool,
    pub downsample_padding: usize,
}

/// Settings of the up blocks ([`UpBlock2D`], [`CrossAttnUpBlock2D`]).
///
/// `in_channels` is the width of the last skip connection (from the previous
/// resolution), `prev_output_channel` that of the previous up block.
#[derive(Debug, Clone, PartialEq)]
pub struct UpBlockConfig {
    pub in_channels: usize,
    pub prev_output_channel: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub resnet: ResnetSettings,
    pub add_upsample: bool,
}

/// Settings of the mid blocks ([`UNetMidBlock2D`], [`UNetMidBlock2DCrossAttn`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MidBlockConfig {
    pub in_channels: usize,
    pub num_layers: usize,
    pub resnet: ResnetSettings,
}

fn resnet_stack(
    vb: &VarBuilder,
    count: usize,
    channels: impl Fn(usize) -> (usize, usize),
    settings: &ResnetSettings,
) -> Result<Vec<ResnetBlock2D>> {
    let vb = vb.pp("resnets");
    (0..count)
        .map(|i| {
            let (cin, cout) = channels(i);
            ResnetBlock2D::new(vb.pp(i), &settings.block(cin, cout))
        })
        .collect()
}

fn downsampler(vb: &VarBuilder, config: &DownBlockConfig) -> Result<Option<Downsample2D>> {
    if !config.add_downsample {
        return Ok(None);
    }
    let c = config.out_channels;
    Ok(Some(Downsample2D::new(
        vb.pp("downsamplers").pp("0"),
        c,
        true,
        Some(c),
        config.downsample_padding,
    )?))
}

fn upsampler(vb: &VarBuilder, add: bool, channels: usize) -> Result<Option<Upsample2D>> {
    if !add {
        return Ok(None);
    }
    Ok(Some(Upsample2D::new(
        vb.pp("upsamplers").pp("0"),
        channels,
        true,
        Some(channels),
    )?))
}

/// Takes the skip connection for the `i`-th resnet of an up block: they are
/// consumed from the end, as diffusers pops them.
fn skip(res: &[Tensor], i: usize) -> Result<&Tensor> {
    res.len()
        .checked_sub(i + 1)
        .and_then(|j| res.get(j))
        .ok_or_else(|| Error::invalid("up block: fewer skip connections than resnets"))
}

fn check_skips(res: &[Tensor], n: usize, what: &str) -> Result<()> {
    if res.len() != n {
        return Err(Error::invalid(format!(
            "{what}: expected {n} skip connections, got {}",
            res.len()
        )));
    }
    Ok(())
}

/// diffusers' `DownBlock2D`: ResNets then an optional downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    pub fn new(vb: VarBuilder, config: &DownBlockConfig) -> Result<Self> {
        let (i0, o) = (config.in_channels, config.out_channels);
        let resnets = resnet_stack(
            &vb,
            config.num_layers,
            |i| (if i == 0 { i0 } else { o }, o),
            &config.resnet,
        )?;
        Ok(Self {
            resnets,
            downsampler: downsampler(&vb, config)?,
        })
    }

    /// Returns the output and the states to keep as skip connections (one per
    /// resnet, plus the downsampled output).
    ///
    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]`
    /// - returns `[B, out_channels, H', W']` (halved when downsampling)
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, temb)?;
            states.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

/// diffusers' `CrossAttnDownBlock2D`: (ResNet, Transformer2DModel) pairs then
/// an optional downsampler.
#[derive(Debug, Clone)]
pub struct CrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    pub fn new(vb: VarBuilder, config: &DownBlockConfig, attn: &CrossAttnSettings) -> Result<Self> {
        let (i0, o) = (config.in_channels, config.out_channels);
        let resnets = resnet_stack(
            &vb,
            config.num_layers,
            |i| (if i == 0 { i0 } else { o }, o),
            &config.resnet,
        )?;
        let tcfg = attn.transformer(o, config.resnet.groups)?;
        let vba = vb.pp("attentions");
        let attentions = (0..config.num_layers)
            .map(|i| Transformer2DModel::new(vba.pp(i), &tcfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions,
            downsampler: downsampler(&vb, config)?,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]`,
    ///   `encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - returns `[B, out_channels, H', W']` and the skip states
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            xs = resnet.forward(&xs, temb)?;
            xs = attn.forward(&xs, encoder_hidden_states)?;
            states.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

/// diffusers' `DownEncoderBlock2D` (VAE encoder): ResNets without time
/// embedding, then an optional downsampler.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    inner: DownBlock2D,
}

impl DownEncoderBlock2D {
    /// `config.resnet.temb_channels` is ignored (no time embedding).
    pub fn new(vb: VarBuilder, config: &DownBlockConfig) -> Result<Self> {
        let mut config = config.clone();
        config.resnet.temb_channels = None;
        Ok(Self {
            inner: DownBlock2D::new(vb, &config)?,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`; returns `[B, out_channels, H', W']`
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(xs, None)?.0)
    }
}

/// diffusers' `UpBlock2D`: ResNets over the concatenation with the skip
/// connections, then an optional upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

fn up_resnet_channels(config: &UpBlockConfig) -> impl Fn(usize) -> (usize, usize) + '_ {
    move |i| {
        let skip = if i + 1 == config.num_layers {
            config.in_channels
        } else {
            config.out_channels
        };
        let input = if i == 0 {
            config.prev_output_channel
        } else {
            config.out_channels
        };
        (input + skip, config.out_channels)
    }
}

impl UpBlock2D {
    pub fn new(vb: VarBuilder, config: &UpBlockConfig) -> Result<Self> {
        let resnets = resnet_stack(
            &vb,
            config.num_layers,
            up_resnet_channels(config),
            &config.resnet,
        )?;
        Ok(Self {
            resnets,
            upsampler: upsampler(&vb, config.add_upsample, config.out_channels)?,
        })
    }

    /// Number of skip connections the block consumes.
    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `res_hidden_states` are this block's skip connections in the order
    /// the down blocks produced them (the last is used first).
    ///
    /// # Shapes
    /// - `xs`: `[B, prev_output_channel, H, W]`, `temb`: `[B, temb_channels]`
    /// - `upsample_size`: output (height, width) of the upsampler, default 2x
    /// - returns `[B, out_channels, H', W']`
    pub fn forward(
        &self,
        xs: &Tensor,
        res_hidden_states: &[Tensor],
        temb: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        check_skips(res_hidden_states, self.resnets.len(), "UpBlock2D")?;
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = Tensor::cat(&[&xs, skip(res_hidden_states, i)?], 1)?;
            xs = resnet.forward(&xs, temb)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}

/// diffusers' `CrossAttnUpBlock2D`: (ResNet over the skip concatenation,
/// Transformer2DModel) pairs, then an optional upsampler.
#[derive(Debug, Clone)]
pub struct CrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    pub fn new(vb: VarBuilder, config: &UpBlockConfig, attn: &CrossAttnSettings) -> Result<Self> {
        let resnets = resnet_stack(
            &vb,
            config.num_layers,
            up_resnet_channels(config),
            &config.resnet,
        )?;
        let tcfg = attn.transformer(config.out_channels, config.resnet.groups)?;
        let vba = vb.pp("attentions");
        let attentions = (0..config.num_layers)
            .map(|i| Transformer2DModel::new(vba.pp(i), &tcfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions,
            upsampler: upsampler(&vb, config.add_upsample, config.out_channels)?,
        })
    }

    /// Number of skip connections the block consumes.
    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// # Shapes
    /// - `xs`: `[B, prev_output_channel, H, W]`, `temb`: `[B, temb_channels]`,
    ///   `encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - `upsample_size`: output (height, width) of the upsampler, default 2x
    /// - returns `[B, out_channels, H', W']`
    pub fn forward(
        &self,
        xs: &Tensor,
        res_hidden_states: &[Tensor],
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        check_skips(res_hidden_states, self.resnets.len(), "CrossAttnUpBlock2D")?;
        let mut xs = xs.clone();
        for (i, (resnet, attn)) in self.resnets.iter().zip(&self.attentions).enumerate() {
            xs = Tensor::cat(&[&xs, skip(res_hidden_states, i)?], 1)?;
            xs = resnet.forward(&xs, temb)?;
            xs = attn.forward(&xs, encoder_hidden_states)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}

/// diffusers' `UpDecoderBlock2D` (VAE decoder): ResNets without skip
/// connections or time embedding, then an optional upsampler.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// Uses `in_channels`, `out_channels`, `num_layers`, `resnet` and
    /// `add_upsample` of `config` (`prev_output_channel` is unused; the time
    /// embedding is disabled).
    pub fn new(vb: VarBuilder, config: &UpBlockConfig) -> Result<Self> {
        let mut settings = config.resnet.clone();
        settings.temb_channels = None;
        let (i0, o) = (config.in_channels, config.out_channels);
        let resnets = resnet_stack(
            &vb,
            config.num_layers,
            |i| (if i == 0 { i0 } else { o }, o),
            &settings,
        )?;
        Ok(Self {
            resnets,
            upsampler: upsampler(&vb, config.add_upsample, o)?,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`; returns `[B, out_channels, 2H, 2W]`
    ///   (or `H, W` without upsampler)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn`: ResNet, then (Transformer2DModel,
/// ResNet) pairs, all at the same width.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    pub fn new(vb: VarBuilder, config: &MidBlockConfig, attn: &CrossAttnSettings) -> Result<Self> {
        let c = config.in_channels;
        let resnets = resnet_stack(&vb, config.num_layers + 1, |_| (c, c), &config.resnet)?;
        let tcfg = attn.transformer(c, config.resnet.groups)?;
        let vba = vb.pp("attentions");
        let attentions = (0..config.num_layers)
            .map(|i| Transformer2DModel::new(vba.pp(i), &tcfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]`,
    ///   `encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - returns `[B, in_channels, H, W]`
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (first, rest) = self
            .resnets
            .split_first()
            .ok_or_else(|| Error::invalid("UNetMidBlock2DCrossAttn without resnets"))?;
        let mut xs = first.forward(xs, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(rest) {
            xs = attn.forward(&xs, encoder_hidden_states)?;
            xs = resnet.forward(&xs, temb)?;
        }
        Ok(xs)
    }
}

/// diffusers' `UNetMidBlock2D` (VAE): ResNet, then (single-head spatial
/// self-attention with group norm and residual, ResNet) pairs.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
}

impl UNetMidBlock2D {
    /// `add_attention` false builds the ResNets only (diffusers'
    /// `mid_block_add_attention`); `attention_head_dim` defaults to
    /// `in_channels` (one head).
    pub fn new(
        vb: VarBuilder,
        config: &MidBlockConfig,
        add_attention: bool,
        attention_head_dim: Option<usize>,
    ) -> Result<Self> {
        let c = config.in_channels;
        let resnets = resnet_stack(&vb, config.num_layers + 1, |_| (c, c), &config.resnet)?;
        let head_dim = attention_head_dim.unwrap_or(c);
        if head_dim == 0 || !c.is_multiple_of(head_dim) {
            return Err(Error::invalid(format!(
                "UNetMidBlock2D: {c} channels cannot be split into heads of width {head_dim}"
            )));
        }
        let acfg = AttentionConfig {
            bias: true,
            upcast_attention: true,
            norm_num_groups: match config.resnet.time_scale_shift {
                TimeEmbeddingNorm::Default => Some(config.resnet.groups),
                TimeEmbeddingNorm::ScaleShift => None,
            },
            eps: config.resnet.eps,
            residual_connection: true,
            rescale_output_factor: config.resnet.output_scale_factor,
            ..AttentionConfig::new(c, c / head_dim, head_dim)
        };
        let attentions = if add_attention {
            let vba = vb.pp("attentions");
            (0..config.num_layers)
                .map(|i| Attention::new(vba.pp(i), &acfg))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]` if any
    /// - returns `[B, in_channels, H, W]`
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let (first, rest) = self
            .resnets
            .split_first()
            .ok_or_else(|| Error::invalid("UNetMidBlock2D without resnets"))?;
        let mut xs = first.forward(xs, temb)?;
        for (i, resnet) in rest.iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, None)?;
            }
            xs = resnet.forward(&xs, temb)?;
        }
        Ok(xs)
    }
}

//! TAESD, the tiny autoencoder: a small conv-only encoder/decoder that maps
//! images to and from Stable Diffusion's latent space, used for cheap previews.
//!
//! Reference: Ollin Boer Bohan, "TAESD: Tiny AutoEncoder for Stable
//! Diffusion", 2023, <https://github.com/madebyollin/taesd> (no paper; it
//! distils the latent space of Rombach et al., "High-Resolution Image
//! Synthesis with Latent Diffusion Models", 2021, arXiv:2112.10752).
//!
//! Reference implementation: diffusers
//! `models/autoencoders/autoencoder_tiny.py` (`AutoencoderTiny`),
//! `models/autoencoders/vae.py` (`EncoderTiny`, `DecoderTiny`) and
//! `models/unets/unet_2d_blocks.py` (`AutoencoderTinyBlock`).
//!
//! # What the latents are
//!
//! TAESD works directly in the latent space the UNet denoises: for SD 1.x/2.x
//! those are AutoencoderKL's latents already multiplied by its
//! `scaling_factor` 0.18215. TAESD's own `scaling_factor` is 1.0, so diffusers'
//! `vae.decode(latents / vae.config.scaling_factor)` passes the UNet's latents
//! unchanged. A caller previewing a denoising step passes the UNet's latents
//! as they are to [`AutoencoderTiny::decode`], without dividing by 0.18215.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::ops::conv::{Conv2d, Conv2dConfig};

fn conv2d(
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::new(vb, in_c, out_c, k, cfg)
}

fn conv2d_no_bias(
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::new_no_bias(vb, in_c, out_c, k, cfg)
}
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Activations diffusers' `get_activation` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyActivation {
    Relu,
    Silu,
    Mish,
    Gelu,
}

impl TinyActivation {
    /// Parses a diffusers `act_fn` name (case-insensitive, as diffusers).
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_lowercase().as_str() {
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            "mish" => Ok(Self::Mish),
            "gelu" => Ok(Self::Gelu),
            _ => Err(Error::UnknownName {
                kind: "activation",
                name: name.to_string(),
                expected: "relu, silu, swish, mish, gelu".to_string(),
            }),
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Relu => xs.relu()?,
            Self::Silu => xs.silu()?,
            // torch.nn.GELU defaults to the exact erf form.
            Self::Gelu => xs.gelu_erf()?,
            Self::Mish => {
                // softplus(x) = max(x, 0) + ln(1 + exp(-|x|)), stable for large |x|.
                let softplus = (xs.relu()? + (xs.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                (xs * softplus.tanh()?)?
            }
        })
    }
}

fn default_three() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64, 64, 64, 64]
}
fn default_act_fn() -> String {
    "relu".to_string()
}
fn default_upsample_fn() -> String {
    "nearest".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_upsampling_scaling_factor() -> usize {
    2
}
fn default_num_encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn default_num_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn default_latent_magnitude() -> f64 {
    3.0
}
fn default_latent_shift() -> f64 {
    0.5
}
fn default_scaling_factor() -> f64 {
    1.0
}

/// diffusers' `AutoencoderTiny` config (`vae/config.json` of a TAESD repo).
/// Defaults are SD 1.x/2.x TAESD's.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct AutoencoderTinyConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_upsample_fn")]
    pub upsample_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_upsampling_scaling_factor")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "default_num_encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "default_num_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "default_latent_magnitude")]
    pub latent_magnitude: f64,
    #[serde(default = "default_latent_shift")]
    pub latent_shift: f64,
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: default_block_out_channels(),
            decoder_block_out_channels: default_block_out_channels(),
            act_fn: default_act_fn(),
            upsample_fn: default_upsample_fn(),
            latent_channels: default_latent_channels(),
            upsampling_scaling_factor: default_upsampling_scaling_factor(),
            num_encoder_blocks: default_num_encoder_blocks(),
            num_decoder_blocks: default_num_decoder_blocks(),
            latent_magnitude: default_latent_magnitude(),
            latent_shift: default_latent_shift(),
            force_upcast: false,
            scaling_factor: default_scaling_factor(),
            shift_factor: 0.0,
        }
    }
}

impl AutoencoderTinyConfig {
    /// Reads and checks a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    /// Checks what diffusers checks, plus sizes that would fail later.
    pub fn validate(&self) -> Result<()> {
        TinyActivation::from_name(&self.act_fn)?;
        if self.upsample_fn != "nearest" {
            return Err(Error::UnknownName {
                kind: "upsample_fn",
                name: self.upsample_fn.clone(),
                expected: "nearest".to_string(),
            });
        }
        if self.encoder_block_out_channels.len() != self.num_encoder_blocks.len() {
            return Err(Error::invalid(
                "AutoencoderTiny config: encoder_block_out_channels and num_encoder_blocks differ in length",
            ));
        }
        if self.decoder_block_out_channels.len() != self.num_decoder_blocks.len() {
            return Err(Error::invalid(
                "AutoencoderTiny config: decoder_block_out_channels and num_decoder_blocks differ in length",
            ));
        }
        if self.encoder_block_out_channels.is_empty() || self.decoder_block_out_channels.is_empty()
        {
            return Err(Error::invalid(
                "AutoencoderTiny config: block_out_channels must not be empty",
            ));
        }
        let channels = self
            .encoder_block_out_channels
            .iter()
            .chain(&self.decoder_block_out_channels)
            .chain([&self.in_channels, &self.out_channels, &self.latent_channels]);
        if channels.into_iter().any(|&c| c == 0) {
            return Err(Error::invalid(
                "AutoencoderTiny config: channel counts must be > 0",
            ));
        }
        if self.upsampling_scaling_factor == 0 {
            return Err(Error::invalid(
                "AutoencoderTiny config: upsampling_scaling_factor must be > 0",
            ));
        }
        Ok(())
    }
}

/// Residual block: three 3x3 convs with activations, a 1x1 skip when the
/// width changes, and a ReLU after the sum.
#[derive(Debug, Clone)]
pub struct AutoencoderTinyBlock {
    conv: [Conv2d; 3],
    skip: Option<Conv2d>,
    act: TinyActivation,
}

impl AutoencoderTinyBlock {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        act: TinyActivation,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let vc = vb.pp("conv");
        // Indices 1 and 3 of the torch Sequential are the activations.
        let conv = [
            conv2d(in_channels, out_channels, 3, cfg, vc.pp(0))?,
            conv2d(out_channels, out_channels, 3, cfg, vc.pp(2))?,
            conv2d(out_channels, out_channels, 3, cfg, vc.pp(4))?,
        ];
        let skip = if in_channels != out_channels {
            Some(conv2d_no_bias(
                in_channels,
                out_channels,
                1,
                Default::default(),
                vb.pp("skip"),
            )?)
        } else {
            None
        };
        Ok(Self { conv, skip, act })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.conv[0].forward(xs)?)?;
        let h = self.act.apply(&self.conv[1].forward(&h)?)?;
        let h = self.conv[2].forward(&h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(xs)?,
            None => xs.clone(),
        };
        Ok((h + skip)?.relu()?)
    }
}

/// One entry of the `layers` Sequential; entries without weights still take
/// an index, so the weight names keep torch's numbering.
#[derive(Debug, Clone)]
enum TinyLayer {
    Conv(Conv2d),
    Block(AutoencoderTinyBlock),
    Act(TinyActivation),
    UpsampleNearest(usize),
}

impl TinyLayer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Conv(c) => Ok(c.forward(xs)?),
            Self::Block(b) => b.forward(xs),
            Self::Act(a) => a.apply(xs),
            Self::UpsampleNearest(f) => {
                let (_, _, h, w) = xs.dims4()?;
                Ok(xs.upsample_nearest2d(h * f, w * f)?)
            }
        }
    }
}

/// Image -> latent encoder (`encoder.layers.N`).
#[derive(Debug, Clone)]
pub struct EncoderTiny {
    layers: Vec<TinyLayer>,
}

impl EncoderTiny {
    pub fn new(vb: VarBuilder, config: &AutoencoderTinyConfig) -> Result<Self> {
        let act = TinyActivation::from_name(&config.act_fn)?;
        let vb = vb.pp("layers");
        let mut layers = Vec::new();
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        for (i, (&ch, &n)) in config
            .encoder_block_out_channels
            .iter()
            .zip(&config.num_encoder_blocks)
            .enumerate()
        {
            let conv = if i == 0 {
                conv2d(config.in_channels, ch, 3, pad, vb.pp(layers.len()))?
            } else {
                let stride2 = Conv2dConfig { stride: 2, ..pad };
                conv2d_no_bias(ch, ch, 3, stride2, vb.pp(layers.len()))?
            };
            layers.push(TinyLayer::Conv(conv));
            for _ in 0..n {
                let block = AutoencoderTinyBlock::new(vb.pp(layers.len()), ch, ch, act)?;
                layers.push(TinyLayer::Block(block));
            }
        }
        let last = *config
            .encoder_block_out_channels
            .last()
            .ok_or_else(|| Error::invalid("AutoencoderTiny: no encoder blocks"))?;
        let conv_out = conv2d(last, config.latent_channels, 3, pad, vb.pp(layers.len()))?;
        layers.push(TinyLayer::Conv(conv_out));
        Ok(Self { layers })
    }

    /// # Shapes
    /// `xs` [B, in_channels, H, W] in [-1, 1] -> [B, latent_channels, H/8, W/8]
    /// (for four stages).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // TAESD was trained on [0, 1] images.
        let mut xs = ((xs + 1.0)? / 2.0)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// Latent -> image decoder (`decoder.layers.N`).
#[derive(Debug, Clone)]
pub struct DecoderTiny {
    layers: Vec<TinyLayer>,
}

impl DecoderTiny {
    pub fn new(vb: VarBuilder, config: &AutoencoderTinyConfig) -> Result<Self> {
        let act = TinyActivation::from_name(&config.act_fn)?;
        let vb = vb.pp("layers");
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let first = *config
            .decoder_block_out_channels
            .first()
            .ok_or_else(|| Error::invalid("AutoencoderTiny: no decoder blocks"))?;
        let mut layers = vec![
            TinyLayer::Conv(conv2d(config.latent_channels, first, 3, pad, vb.pp(0))?),
            TinyLayer::Act(act),
        ];
        let stages = config.num_decoder_blocks.len();
        for (i, (&ch, &n)) in config
            .decoder_block_out_channels
            .iter()
            .zip(&config.num_decoder_blocks)
            .enumerate()
        {
            let is_final = i + 1 == stages;
            for _ in 0..n {
                let block = AutoencoderTinyBlock::new(vb.pp(layers.len()), ch, ch, act)?;
                layers.push(TinyLayer::Block(block));
            }
            if !is_final {
                layers.push(TinyLayer::UpsampleNearest(config.upsampling_scaling_factor));
            }
            let conv = if is_final {
                conv2d(ch, config.out_channels, 3, pad, vb.pp(layers.len()))?
            } else {
                conv2d_no_bias(ch, ch, 3, pad, vb.pp(layers.len()))?
            };
            layers.push(TinyLayer::Conv(conv));
        }
        Ok(Self { layers })
    }

    /// # Shapes
    /// `xs` [B, latent_channels, h, w] -> [B, out_channels, 8h, 8w] in
    /// roughly [-1, 1] (not clamped), for four stages.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Soft clamp of the latents to (-3, 3), as TAESD was trained.
        let mut xs = ((xs / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        // TAESD outputs [0, 1]; diffusers' convention is [-1, 1].
        Ok(((xs * 2.0)? - 1.0)?)
    }
}

/// diffusers' `AutoencoderTiny`.
#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    encoder: Option<EncoderTiny>,
    decoder: DecoderTiny,
    config: AutoencoderTinyConfig,
}

impl AutoencoderTiny {
    /// Builds both halves from a diffusers-layout checkpoint
    /// (`encoder.layers.N...`, `decoder.layers.N...`).
    pub fn new(vb: VarBuilder, config: &AutoencoderTinyConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            encoder: Some(EncoderTiny::new(vb.pp("encoder"), config)?),
            decoder: DecoderTiny::new(vb.pp("decoder"), config)?,
            config: config.clone(),
        })
    }

    /// Loads madebyollin's `taesd_encoder.safetensors` /
    /// `taesd_decoder.safetensors` (ComfyUI `vae_approx` naming, often bf16)
    /// with the default (SD 1.x/2.x) config; also fits the SDXL files, which
    /// share the architecture. Weights are converted to `dtype`. Without an
    /// encoder file, [`Self::encode`] returns an error.
    pub fn from_taesd_files(
        encoder: Option<&Path>,
        decoder: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = AutoencoderTinyConfig::default();
        let mut tensors = HashMap::new();
        if let Some(path) = encoder {
            tensors.extend(taesd_tensors(path, TaesdPart::Encoder)?);
        }
        tensors.extend(taesd_tensors(decoder, TaesdPart::Decoder)?);
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let with_path = |path: &Path, e: Error| Error::Model {
            path: path.to_path_buf(),
            message: format!("not a TAESD checkpoint: {e}"),
        };
        let encoder = match encoder {
            Some(path) => {
                Some(EncoderTiny::new(vb.pp("encoder"), &config).map_err(|e| with_path(path, e))?)
            }
            None => None,
        };
        let decoder_model =
            DecoderTiny::new(vb.pp("decoder"), &config).map_err(|e| with_path(decoder, e))?;
        Ok(Self {
            encoder,
            decoder: decoder_model,
            config,
        })
    }

    /// The config this model was built with.
    pub fn config(&self) -> &AutoencoderTinyConfig {
        &self.config
    }

    /// Whether [`Self::encode`] is available.
    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// Images in [-1, 1] to latents in the UNet's latent space (diffusers'
    /// `AutoencoderTiny.encode(x).latents`; multiply by `scaling_factor`,
    /// 1.0 for TAESD, to follow diffusers' img2img exactly).
    ///
    /// # Shapes
    /// `x` [B, in_channels, H, W], H and W multiples of 8 -> [B, latent_channels, H/8, W/8]
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let encoder = self
            .encoder
            .as_ref()
            .ok_or_else(|| Error::invalid("this AutoencoderTiny was loaded without an encoder"))?;
        check_nchw(x, self.config.in_channels, "AutoencoderTiny.encode input")?;
        encoder.forward(x)
    }

    /// The UNet's latents (SD: already scaled by AutoencoderKL's 0.18215; do
    /// not divide by it) to images in [-1, 1], not clamped (diffusers'
    /// `AutoencoderTiny.decode(latents).sample`; to map to pixels, do as
    /// diffusers' image processor: `(x / 2 + 0.5).clamp(0, 1)`).
    ///
    /// # Shapes
    /// `latents` [B, latent_channels, h, w] -> [B, out_channels, 8h, 8w]
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        check_nchw(
            latents,
            self.config.latent_channels,
            "AutoencoderTiny.decode latents",
        )?;
        self.decoder.forward(latents)
    }

    /// diffusers' `scale_latents`: latents to [0, 1] for storing as 8-bit images.
    pub fn scale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let m = 2.0 * self.config.latent_magnitude;
        Ok(((latents / m)? + self.config.latent_shift)?.clamp(0f32, 1f32)?)
    }

    /// diffusers' `unscale_latents`, the inverse of [`Self::scale_latents`].
    pub fn unscale_latents(&self, scaled: &Tensor) -> Result<Tensor> {
        let m = 2.0 * self.config.latent_magnitude;
        Ok(((scaled - self.config.latent_shift)? * m)?)
    }
}

fn check_nchw(x: &Tensor, channels: usize, what: &str) -> Result<()> {
    let dims = x.dims();
    if dims.len() != 4 || dims[1] != channels {
        return Err(Error::Shape {
            what: what.to_string(),
            expected: format!("[batch, {channels}, height, width]"),
            got: format!("{dims:?}"),
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaesdPart {
    Encoder,
    Decoder,
}

/// The one place that maps madebyollin / ComfyUI TAESD names onto diffusers'.
///
/// The original encoder Sequential has the same numbering as diffusers'
/// `encoder.layers`; the original decoder starts with a `Clamp` module at
/// index 0, which diffusers does inside `forward`, so decoder indices shift
/// down by one.
fn taesd_name(name: &str, part: TaesdPart) -> Option<String> {
    let (index, rest) = name.split_once('.')?;
    let index: usize = index.parse().ok()?;
    match part {
        TaesdPart::Encoder => Some(format!("encoder.layers.{index}.{rest}")),
        TaesdPart::Decoder => Some(format!("decoder.layers.{}.{rest}", index.checked_sub(1)?)),
    }
}

/// madebyollin's TAESD encoder and decoder files under diffusers'
/// `AutoencoderTiny` names (`encoder.layers.N...`, `decoder.layers.N...`),
/// in f32, sorted by name: what a diffusers `vae/` folder stores.
pub fn taesd_diffusers_tensors(encoder: &Path, decoder: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut all: Vec<(String, Tensor)> = Vec::new();
    for (path, part) in [(encoder, TaesdPart::Encoder), (decoder, TaesdPart::Decoder)] {
        for (name, t) in taesd_tensors(path, part)? {
            all.push((name, t.to_dtype(DType::F32)?));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all)
}

fn taesd_tensors(path: &Path, part: TaesdPart) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    // Loaded on the CPU in the stored dtype; the VarBuilder converts each
    // tensor to the compute dtype and device when the model asks for it.
    let raw = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    raw.into_iter()
        .map(|(name, tensor)| {
            let mapped = taesd_name(&name, part).ok_or_else(|| Error::Model {
                path: path.to_path_buf(),
                message: format!("unexpected tensor '{name}' for a TAESD {part:?}"),
            })?;
            Ok((mapped, tensor))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taesd_names_map_onto_diffusers() {
        assert_eq!(
            taesd_name("1.conv.4.weight", TaesdPart::Encoder).as_deref(),
            Some("encoder.layers.1.conv.4.weight")
        );
        assert_eq!(
            taesd_name("1.weight", TaesdPart::Decoder).as_deref(),
            Some("decoder.layers.0.weight")
        );
        assert_eq!(
            taesd_name("19.bias", TaesdPart::Decoder).as_deref(),
            Some("decoder.layers.18.bias")
        );
        assert_eq!(taesd_name("0.weight", TaesdPart::Decoder), None);
        assert_eq!(taesd_name("weight", TaesdPart::Encoder), None);
    }
}

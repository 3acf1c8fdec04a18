//! CLIP text encoder: the causal transformer that turns prompt tokens into the
//! hidden states Stable Diffusion's UNet attends to.
//!
//! Paper: Radford, Kim, Hallacy, Ramesh, Goh, Agarwal, Sastry, Askell, Mishkin,
//! Clark, Krueger, Sutskever, "Learning Transferable Visual Models From Natural
//! Language Supervision", 2021, arXiv:2103.00020.
//!
//! Reference implementation: transformers `models/clip/modeling_clip.py`
//! (`CLIPTextModel`, `CLIPTextEmbeddings`, `CLIPEncoderLayer`, `CLIPAttention`,
//! `CLIPMLP`) and, for `clip_skip`, diffusers
//! `pipelines/stable_diffusion/pipeline_stable_diffusion.py` (`encode_prompt`).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};
use serde::{Deserialize, Serialize};

// ensueno's linear and layer norm: the same weights and numbers as
// candle-nn's, plus a backward pass (`ensueno train clip` trains this model).
use crate::ops::layer_norm::{layer_norm, LayerNorm};
use crate::ops::linear::{linear, Linear};

use crate::{Error, Result};

/// Activations CLIP text encoders use, by their transformers names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP (SD 1.x).
    QuickGelu,
    /// Exact erf GELU: OpenCLIP ViT-H (SD 2.x).
    Gelu,
    /// Tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl HiddenAct {
    const EXPECTED: &'static str = "quick_gelu, gelu, gelu_new, gelu_pytorch_tanh";

    /// Parses a transformers `hidden_act` name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(Error::UnknownName {
                kind: "activation",
                name: other.to_string(),
                expected: Self::EXPECTED.to_string(),
            }),
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            Self::Gelu => xs.gelu_erf()?,
            Self::GeluTanh => xs.gelu()?,
        })
    }
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_projection_dim() -> usize {
    512
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pad_token_id() -> Option<u32> {
    Some(1)
}
fn default_bos_token_id() -> Option<u32> {
    Some(49406)
}
fn default_eos_token_id() -> Option<u32> {
    Some(49407)
}

/// transformers' `CLIPTextConfig`, read from a `text_encoder/config.json`.
///
/// Defaults are transformers' (the `openai/clip-vit-base-patch32` text tower).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CLIPTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_bos_token_id")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: Option<u32>,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            hidden_size: default_hidden_size(),
            intermediate_size: default_intermediate_size(),
            projection_dim: default_projection_dim(),
            num_hidden_layers: default_num_hidden_layers(),
            num_attention_heads: default_num_attention_heads(),
            max_position_embeddings: default_max_position_embeddings(),
            hidden_act: default_hidden_act(),
            layer_norm_eps: default_layer_norm_eps(),
            pad_token_id: default_pad_token_id(),
            bos_token_id: default_bos_token_id(),
            eos_token_id: default_eos_token_id(),
        }
    }
}

impl CLIPTextConfig {
    /// Reads and checks a transformers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    /// Checks that the sizes are usable and the activation is known.
    pub fn validate(&self) -> Result<()> {
        HiddenAct::from_name(&self.hidden_act)?;
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        super::config_defaults::check_positive("CLIP text", &sizes)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::invalid(format!(
                "CLIP text config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(Error::invalid(format!(
                "CLIP text config: layer_norm_eps must be > 0, got {}",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }
}

impl CLIPTextConfig {
    /// The sizes of its stack of encoder layers.
    pub fn encoder_config(&self) -> Result<CLIPEncoderConfig> {
        Ok(CLIPEncoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            hidden_act: HiddenAct::from_name(&self.hidden_act)?,
            layer_norm_eps: self.layer_norm_eps,
        })
    }
}

/// The sizes of a stack of CLIP encoder layers: the part of the text and
/// vision configs (`CLIPTextConfig`, `CLIPVisionConfig`) that the two
/// towers' transformers share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CLIPEncoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
}

/// The initialisation transformers' `CLIPPreTrainedModel` gives embeddings
/// (normal, standard deviation 0.02): what a model trained from scratch
/// starts from. Loading a checkpoint ignores it.
pub(crate) const EMBEDDING_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// An embedding table `[n, dim]` named `weight` under `vb`.
pub(crate) fn embedding(n: usize, dim: usize, vb: VarBuilder) -> Result<Embedding> {
    let weight = vb.get_with_hints((n, dim), "weight", EMBEDDING_INIT)?;
    Ok(Embedding::new(weight, dim))
}

/// Token plus learned absolute position embeddings.
#[derive(Debug, Clone)]
pub struct CLIPTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
}

impl CLIPTextEmbeddings {
    pub fn new(vb: VarBuilder, config: &CLIPTextConfig) -> Result<Self> {
        Ok(Self {
            token_embedding: embedding(
                config.vocab_size,
                config.hidden_size,
                vb.pp("token_embedding"),
            )?,
            position_embedding: embedding(
                config.max_position_embeddings,
                config.hidden_size,
                vb.pp("position_embedding"),
            )?,
        })
    }

    /// # Shapes
    /// `input_ids` [B, T] integer -> [B, T, hidden]
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let positions = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        let tokens = self.token_embedding.forward(input_ids)?;
        let positions = self.position_embedding.forward(&positions)?;
        Ok(tokens.broadcast_add(&positions)?)
    }
}

/// Multi-head self-attention with separate q/k/v/out projections.
#[derive(Debug, Clone)]
pub struct CLIPAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl CLIPAttention {
    pub fn new(vb: VarBuilder, config: &CLIPEncoderConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            num_heads: config.num_attention_heads,
        })
    }

    /// # Shapes
    /// `xs` [B, T, hidden], `mask` additive f32 [T, T] -> [B, T, hidden]
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let out = super::attention::text_self_attention(
            &self.q_proj.forward(xs)?,
            &self.k_proj.forward(xs)?,
            &self.v_proj.forward(xs)?,
            self.num_heads,
            mask,
        )?;
        Ok(self.out_proj.forward(&out)?)
    }
}

/// The feed-forward block: fc1, activation, fc2.
#[derive(Debug, Clone)]
pub struct CLIPMLP {
    fc1: Linear,
    fc2: Linear,
    act: HiddenAct,
}

impl CLIPMLP {
    pub fn new(vb: VarBuilder, config: &CLIPEncoderConfig) -> Result<Self> {
        Ok(Self {
            fc1: linear(config.hidden_size, config.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(config.intermediate_size, config.hidden_size, vb.pp("fc2"))?,
            act: config.hidden_act,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.fc1.forward(xs)?;
        let xs = self.act.apply(&xs)?;
        Ok(self.fc2.forward(&xs)?)
    }
}

/// One pre-norm transformer layer.
#[derive(Debug, Clone)]
pub struct CLIPEncoderLayer {
    self_attn: CLIPAttention,
    layer_norm1: LayerNorm,
    mlp: CLIPMLP,
    layer_norm2: LayerNorm,
}

impl CLIPEncoderLayer {
    pub fn new(vb: VarBuilder, config: &CLIPEncoderConfig) -> Result<Self> {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        Ok(Self {
            self_attn: CLIPAttention::new(vb.pp("self_attn"), config)?,
            layer_norm1: layer_norm(h, eps, vb.pp("layer_norm1"))?,
            mlp: CLIPMLP::new(vb.pp("mlp"), config)?,
            layer_norm2: layer_norm(h, eps, vb.pp("layer_norm2"))?,
        })
    }

    /// # Shapes
    /// `xs` [B, T, hidden], `mask` additive f32 [T, T] -> [B, T, hidden]
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        Ok((xs + h)?)
    }
}

/// The stack of encoder layers (`text_model.encoder`, `vision_model.encoder`).
#[derive(Debug, Clone)]
pub struct CLIPEncoder {
    layers: Vec<CLIPEncoderLayer>,
}

impl CLIPEncoder {
    pub fn new(vb: VarBuilder, config: &CLIPEncoderConfig) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..config.num_hidden_layers)
            .map(|i| CLIPEncoderLayer::new(vb.pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Runs every layer.
    ///
    /// # Shapes
    /// `xs` [B, T, hidden], `mask` additive f32 [T, T] -> [B, T, hidden]
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, mask)?;
        }
        Ok(xs)
    }
}

/// CLIP's text tower without projection (transformers `CLIPTextModel`).
#[derive(Debug, Clone)]
pub struct CLIPTextModel {
    embeddings: CLIPTextEmbeddings,
    encoder: CLIPEncoder,
    final_layer_norm: LayerNorm,
    max_position_embeddings: usize,
    eos_token_id: Option<u32>,
}

impl CLIPTextModel {
    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.final_layer_norm.weight().dim(0).unwrap_or(0)
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        self.final_layer_norm.weight().device()
    }

    /// Builds the model from a `VarBuilder` at the checkpoint root.
    ///
    /// Stable Diffusion repositories (written by transformers 4.x) store the
    /// tensors under `text_model.`; transformers 5 writes them at the root.
    /// Both layouts load.
    pub fn new(vb: VarBuilder, config: &CLIPTextConfig) -> Result<Self> {
        config.validate()?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        Ok(Self {
            embeddings: CLIPTextEmbeddings::new(vb.pp("embeddings"), config)?,
            encoder: CLIPEncoder::new(vb.pp("encoder"), &config.encoder_config()?)?,
            final_layer_norm: layer_norm(
                config.hidden_size,
                config.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            max_position_embeddings: config.max_position_embeddings,
            eos_token_id: config.eos_token_id,
        })
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    /// The last hidden state after the final layer norm (what Stable
    /// Diffusion conditions on when `clip_skip` is unset).
    ///
    /// # Shapes
    /// `input_ids` u32 [B, T] with T <= `max_position_embeddings` -> [B, T, hidden]
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_clip_skip(input_ids, 0)
    }

    /// diffusers' `clip_skip`: 0 gives [`Self::forward`]; k >= 1 takes the
    /// output of layer `num_layers - k` (`hidden_states[-(k + 1)]`, where
    /// `hidden_states[0]` is the embeddings) and applies the final layer norm.
    /// k may be at most `num_layers`.
    ///
    /// # Shapes
    /// `input_ids` u32 [B, T] with T <= `max_position_embeddings` -> [B, T, hidden]
    pub fn forward_with_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let dims = input_ids.dims();
        if dims.len() != 2 {
            return Err(Error::Shape {
                what: "CLIP text model input_ids".to_string(),
                expected: "[batch, tokens]".to_string(),
                got: format!("{dims:?}"),
            });
        }
        if !matches!(input_ids.dtype(), DType::U32 | DType::I64 | DType::U8) {
            return Err(Error::invalid(format!(
                "CLIP text model input_ids must be integer token ids, got {:?}",
                input_ids.dtype()
            )));
        }
        let seq_len = dims[1];
        if seq_len == 0 || seq_len > self.max_position_embeddings {
            return Err(Error::invalid(format!(
                "CLIP text model: sequence length {seq_len} must be between 1 and max_position_embeddings {}",
                self.max_position_embeddings
            )));
        }
        let num_layers = self.num_layers();
        if clip_skip > num_layers {
            return Err(Error::invalid(format!(
                "clip_skip {clip_skip} is larger than the text encoder's {num_layers} layers"
            )));
        }
        let mask = causal_mask(seq_len, input_ids.device())?;
        let mut xs = self.embeddings.forward(input_ids)?;
        for layer in &self.encoder.layers[..num_layers - clip_skip] {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
    }
}

impl CLIPTextModel {
    /// transformers' `pooler_output`: each prompt's final hidden state at its
    /// end-of-text token, the first position holding `eos_token_id` (the
    /// position of the largest id for configs with the legacy
    /// `eos_token_id` 2 or none, and position 0 for a row without it, as
    /// transformers does). Causal attention makes this state depend only on
    /// the tokens up to the end of the text, not on the padding after it.
    ///
    /// # Shapes
    /// `last_hidden_state` [B, T, hidden], `input_ids` u32 [B, T] -> [B, hidden]
    pub fn pooled_output(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t, hidden) = last_hidden_state.dims3()?;
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        if ids.len() != b || ids.iter().any(|row| row.len() != t) {
            return Err(Error::Shape {
                what: "CLIP pooled output input_ids".to_string(),
                expected: format!("[{b}, {t}]"),
                got: format!("{:?}", input_ids.dims()),
            });
        }
        let positions: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(row, tokens)| {
                let at = match self.eos_token_id {
                    Some(eos) if eos != 2 => tokens.iter().position(|&id| id == eos).unwrap_or(0),
                    _ => {
                        let max = tokens.iter().copied().max().unwrap_or(0);
                        tokens.iter().position(|&id| id == max).unwrap_or(0)
                    }
                };
                (row * t + at) as u32
            })
            .collect();
        let index = Tensor::from_vec(positions, b, last_hidden_state.device())?;
        Ok(last_hidden_state
            .reshape((b * t, hidden))?
            .index_select(&index, 0)?)
    }
}

/// Additive mask: 0 on and below the diagonal, -inf above, so a token sees
/// only itself and the tokens before it.
fn causal_mask(seq_len: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (seq_len, seq_len), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_activation_is_an_error() {
        let err = HiddenAct::from_name("swish").unwrap_err();
        assert!(matches!(err, Error::UnknownName { .. }), "{err}");
    }

    #[test]
    fn mask_is_causal() -> Result<()> {
        let m = causal_mask(3, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0][0], 0.0);
        assert!(m[0][1].is_infinite());
        assert_eq!(m[2][1], 0.0);
        Ok(())
    }
}

//! BERT: the bidirectional transformer encoder behind sentence encoders such
//! as all-MiniLM-L6-v2, used here as a frozen text encoder.
//!
//! Paper: Devlin, Chang, Lee, Toutanova, "BERT: Pre-training of Deep
//! Bidirectional Transformers for Language Understanding", 2018,
//! arXiv:1810.04805. (MiniLM: Wang, Wei, Dong, Bao, Yang, Zhou, 2020,
//! arXiv:2002.10957, is a distilled BERT with the same architecture.)
//!
//! Reference implementation: transformers `models/bert/modeling_bert.py`
//! (`BertModel`, `BertEmbeddings`, `BertSelfAttention`, `BertSelfOutput`,
//! `BertIntermediate`, `BertOutput`, `BertLayer`, `BertPooler`) with the
//! padding mask of `masking_utils.create_bidirectional_mask`, encoder-only
//! (`is_decoder = false`), absolute position embeddings.

use std::path::Path;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::{Error, Result};

fn default_vocab_size() -> usize {
    30522
}
fn default_hidden_size() -> usize {
    768
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    12
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_hidden_act() -> String {
    "gelu".to_string()
}
fn default_max_position_embeddings() -> usize {
    512
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_pad_token_id() -> Option<u32> {
    Some(0)
}
fn default_position_embedding_type() -> String {
    "absolute".to_string()
}

/// transformers' `BertConfig`, read from a `config.json`.
///
/// Defaults are transformers' (`bert-base-uncased`). Dropout probabilities
/// are not read: the model only runs in inference.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub is_decoder: bool,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            hidden_size: default_hidden_size(),
            num_hidden_layers: default_num_hidden_layers(),
            num_attention_heads: default_num_attention_heads(),
            intermediate_size: default_intermediate_size(),
            hidden_act: default_hidden_act(),
            max_position_embeddings: default_max_position_embeddings(),
            type_vocab_size: default_type_vocab_size(),
            layer_norm_eps: default_layer_norm_eps(),
            pad_token_id: default_pad_token_id(),
            position_embedding_type: default_position_embedding_type(),
            is_decoder: false,
        }
    }
}

impl BertConfig {
    /// Reads and checks a transformers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    /// Checks that the sizes are usable and the variant is one we implement.
    pub fn validate(&self) -> Result<()> {
        BertAct::from_name(&self.hidden_act)?;
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        super::config_defaults::check_positive("BERT", &sizes)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::invalid(format!(
                "BERT config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(Error::invalid(format!(
                "BERT config: layer_norm_eps must be > 0, got {}",
                self.layer_norm_eps
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(Error::invalid(format!(
                "BERT config: position_embedding_type '{}' is not supported (only 'absolute')",
                self.position_embedding_type
            )));
        }
        if self.is_decoder {
            return Err(Error::invalid(
                "BERT config: is_decoder = true (causal BERT) is not supported; only the encoder is",
            ));
        }
        Ok(())
    }
}

/// The feed-forward activations BERT configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BertAct {
    /// Exact erf GELU (transformers' "gelu").
    Gelu,
    /// Tanh approximation of GELU.
    GeluTanh,
    Relu,
    Silu,
}

impl BertAct {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(Error::UnknownName {
                kind: "BERT activation",
                name: other.to_string(),
                expected: "gelu, gelu_new, gelu_pytorch_tanh, relu, silu, swish".to_string(),
            }),
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu => xs.gelu_erf()?,
            Self::GeluTanh => xs.gelu()?,
            Self::Relu => xs.relu()?,
            Self::Silu => xs.silu()?,
        })
    }
}

/// Word, absolute position and token type embeddings, summed and normalised.
#[derive(Debug, Clone)]
#[allow(non_snake_case)]
pub struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    LayerNorm: LayerNorm,
}

impl BertEmbeddings {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            word_embeddings: embedding(config.vocab_size, h, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                config.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: embedding(
                config.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?,
            LayerNorm: layer_norm(h, config.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// # Shapes
    /// `input_ids`, `token_type_ids` u32 [B, T] -> [B, T, hidden]
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let xs = self.word_embeddings.forward(input_ids)?;
        let xs = (xs + self.token_type_embeddings.forward(token_type_ids)?)?;
        let xs = xs.broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        Ok(self.LayerNorm.forward(&xs)?)
    }
}

/// Multi-head self-attention (the `attention.self` module).
#[derive(Debug, Clone)]
pub struct BertSelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    num_heads: usize,
}

impl BertSelfAttention {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            query: linear(h, h, vb.pp("query"))?,
            key: linear(h, h, vb.pp("key"))?,
            value: linear(h, h, vb.pp("value"))?,
            num_heads: config.num_attention_heads,
        })
    }

    /// # Shapes
    /// `xs` [B, T, hidden], `mask_bias` additive f32 [B, 1, 1, T] (0 for
    /// kept keys, a large negative number for padding) -> [B, T, hidden]
    pub fn forward(&self, xs: &Tensor, mask_bias: Option<&Tensor>) -> Result<Tensor> {
        super::attention::text_self_attention(
            &self.query.forward(xs)?,
            &self.key.forward(xs)?,
            &self.value.forward(xs)?,
            self.num_heads,
            mask_bias,
        )
    }
}

/// Output projection, residual and layer norm (`attention.output`).
#[derive(Debug, Clone)]
#[allow(non_snake_case)]
pub struct BertSelfOutput {
    dense: Linear,
    LayerNorm: LayerNorm,
}

impl BertSelfOutput {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            dense: linear(h, h, vb.pp("dense"))?,
            LayerNorm: layer_norm(h, config.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `LayerNorm(dense(xs) + residual)`.
    pub fn forward(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let xs = self.dense.forward(xs)?;
        Ok(self.LayerNorm.forward(&(xs + residual)?)?)
    }
}

/// Self-attention plus its output block (the `attention` module).
#[derive(Debug, Clone)]
pub struct BertAttention {
    /// `attention.self` in the checkpoint (`self` is a Rust keyword).
    self_attention: BertSelfAttention,
    output: BertSelfOutput,
}

impl BertAttention {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Ok(Self {
            self_attention: BertSelfAttention::new(vb.pp("self"), config)?,
            output: BertSelfOutput::new(vb.pp("output"), config)?,
        })
    }

    /// # Shapes
    /// `xs` [B, T, hidden], `mask_bias` f32 [B, 1, 1, T] -> [B, T, hidden]
    pub fn forward(&self, xs: &Tensor, mask_bias: Option<&Tensor>) -> Result<Tensor> {
        let h = self.self_attention.forward(xs, mask_bias)?;
        self.output.forward(&h, xs)
    }
}

/// The first half of the feed-forward block: dense to `intermediate_size`
/// and the activation.
#[derive(Debug, Clone)]
pub struct BertIntermediate {
    dense: Linear,
    act: BertAct,
}

impl BertIntermediate {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Ok(Self {
            dense: linear(config.hidden_size, config.intermediate_size, vb.pp("dense"))?,
            act: BertAct::from_name(&config.hidden_act)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.act.apply(&self.dense.forward(xs)?)
    }
}

/// The second half of the feed-forward block: dense back to `hidden_size`,
/// residual and layer norm.
#[derive(Debug, Clone)]
#[allow(non_snake_case)]
pub struct BertOutput {
    dense: Linear,
    LayerNorm: LayerNorm,
}

impl BertOutput {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Ok(Self {
            dense: linear(config.intermediate_size, config.hidden_size, vb.pp("dense"))?,
            LayerNorm: layer_norm(
                config.hidden_size,
                config.layer_norm_eps,
                vb.pp("LayerNorm"),
            )?,
        })
    }

    /// `LayerNorm(dense(xs) + residual)`.
    pub fn forward(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let xs = self.dense.forward(xs)?;
        Ok(self.LayerNorm.forward(&(xs + residual)?)?)
    }
}

/// One post-norm transformer layer.
#[derive(Debug, Clone)]
pub struct BertLayer {
    attention: BertAttention,
    intermediate: BertIntermediate,
    output: BertOutput,
}

impl BertLayer {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Ok(Self {
            attention: BertAttention::new(vb.pp("attention"), config)?,
            intermediate: BertIntermediate::new(vb.pp("intermediate"), config)?,
            output: BertOutput::new(vb.pp("output"), config)?,
        })
    }

    /// # Shapes
    /// `xs` [B, T, hidden], `mask_bias` f32 [B, 1, 1, T] -> [B, T, hidden]
    pub fn forward(&self, xs: &Tensor, mask_bias: Option<&Tensor>) -> Result<Tensor> {
        let xs = self.attention.forward(xs, mask_bias)?;
        let h = self.intermediate.forward(&xs)?;
        self.output.forward(&h, &xs)
    }
}

/// The stack of layers (`encoder.layer.N`).
#[derive(Debug, Clone)]
pub struct BertEncoder {
    layer: Vec<BertLayer>,
}

impl BertEncoder {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let vb = vb.pp("layer");
        let layer = (0..config.num_hidden_layers)
            .map(|i| BertLayer::new(vb.pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layer })
    }

    /// # Shapes
    /// `xs` [B, T, hidden], `mask_bias` f32 [B, 1, 1, T] -> [B, T, hidden]
    pub fn forward(&self, xs: &Tensor, mask_bias: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layer {
            xs = layer.forward(&xs, mask_bias)?;
        }
        Ok(xs)
    }
}

/// `tanh(dense(h[:, 0]))`: the next-sentence head's input. Sentence
/// encoders do not use it, and checkpoints may leave it out.
#[derive(Debug, Clone)]
pub struct BertPooler {
    dense: Linear,
}

impl BertPooler {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            dense: linear(h, h, vb.pp("dense"))?,
        })
    }

    /// # Shapes
    /// `hidden` [B, T, hidden] -> [B, hidden]
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.dense.forward(&first)?.tanh()?)
    }
}

/// transformers' `BertModel` (encoder only).
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    pooler: Option<BertPooler>,
    config: BertConfig,
}

impl BertModel {
    /// Builds the model from a `VarBuilder` at the checkpoint root.
    ///
    /// Bare `BertModel` checkpoints (sentence-transformers, transformers'
    /// `save_pretrained`) store tensors at the root; task models
    /// (`BertForMaskedLM`...) put them under `bert.`. Both load. The pooler
    /// is loaded only when the checkpoint has it.
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        config.validate()?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let pooler = if vb.contains_tensor("pooler.dense.weight") {
            Some(BertPooler::new(vb.pp("pooler"), config)?)
        } else {
            None
        };
        Ok(Self {
            embeddings: BertEmbeddings::new(vb.pp("embeddings"), config)?,
            encoder: BertEncoder::new(vb.pp("encoder"), config)?,
            pooler,
            config: config.clone(),
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Where the weights live.
    pub fn device(&self) -> &candle_core::Device {
        self.embeddings.word_embeddings.embeddings().device()
    }

    /// The pooler, when the checkpoint has one.
    pub fn pooler(&self) -> Option<&BertPooler> {
        self.pooler.as_ref()
    }

    /// The last hidden state.
    ///
    /// Padded keys (mask 0) get a bias of `f32::MIN` before the softmax, as
    /// transformers' eager attention does; padded query positions are still
    /// computed (they attend to the real tokens) so the output matches the
    /// reference everywhere, padding included.
    ///
    /// # Shapes
    /// - `input_ids`: integer (u32, i64 or u8) [B, T], 1 <= T <=
    ///   `max_position_embeddings`, ids < `vocab_size`
    /// - `token_type_ids`: integer [B, T], ids < `type_vocab_size`; `None`
    ///   means all zeros
    /// - `attention_mask`: [B, T], 1 for tokens, 0 for padding (any
    ///   numeric dtype); `None` means all ones
    /// - returns [B, T, hidden] in the weights' dtype
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = match input_ids.dims() {
            [b, t] => (*b, *t),
            dims => {
                return Err(Error::Shape {
                    what: "BERT input_ids".to_string(),
                    expected: "[batch, tokens]".to_string(),
                    got: format!("{dims:?}"),
                })
            }
        };
        if b == 0 {
            return Err(Error::invalid("BERT: empty batch (input_ids has 0 rows)"));
        }
        if t == 0 || t > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "BERT: sequence length {t} must be between 1 and max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let input_ids = checked_ids(input_ids, "input_ids", self.config.vocab_size)?;
        let token_type_ids = match token_type_ids {
            Some(tt) => {
                same_shape(tt, (b, t), "BERT token_type_ids")?;
                checked_ids(tt, "token_type_ids", self.config.type_vocab_size)?
            }
            None => input_ids.zeros_like()?,
        };
        let mask_bias = match attention_mask {
            Some(m) => {
                same_shape(m, (b, t), "BERT attention_mask")?;
                // (1 - mask) * MIN: 0 where kept, f32::MIN where padded.
                let keep = m.to_dtype(DType::F32)?;
                let bias = ((keep.ones_like()? - keep)? * f64::from(f32::MIN))?;
                Some(bias.reshape((b, 1, 1, t))?)
            }
            None => None,
        };
        let xs = self.embeddings.forward(&input_ids, &token_type_ids)?;
        self.encoder.forward(&xs, mask_bias.as_ref())
    }
}

fn same_shape(t: &Tensor, expected: (usize, usize), what: &str) -> Result<()> {
    if t.dims() != [expected.0, expected.1] {
        return Err(Error::Shape {
            what: what.to_string(),
            expected: format!("[{}, {}]", expected.0, expected.1),
            got: format!("{:?}", t.dims()),
        });
    }
    Ok(())
}

/// Checks that `ids` are integers in `0..limit` and returns them as u32.
fn checked_ids(ids: &Tensor, what: &str, limit: usize) -> Result<Tensor> {
    if !matches!(ids.dtype(), DType::U32 | DType::I64 | DType::U8) {
        return Err(Error::invalid(format!(
            "BERT {what} must be integer ids (u32, i64 or u8), got {:?}",
            ids.dtype()
        )));
    }
    // An out-of-range id would index past the embedding table.
    let flat = ids.flatten_all()?.to_dtype(DType::F64)?;
    let (lo, hi) = (
        flat.min(D::Minus1)?.to_scalar::<f64>()?,
        flat.max(D::Minus1)?.to_scalar::<f64>()?,
    );
    if lo < 0.0 || hi >= limit as f64 {
        return Err(Error::invalid(format!(
            "BERT {what}: ids must be in 0..{limit}, got values from {lo} to {hi}"
        )));
    }
    Ok(ids.to_dtype(DType::U32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c: BertConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, BertConfig::default());
        assert!(c.validate().is_ok());
        let bad = BertConfig {
            num_attention_heads: 5,
            ..BertConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = BertConfig {
            hidden_act: "mish".into(),
            ..BertConfig::default()
        };
        assert!(matches!(bad.validate(), Err(Error::UnknownName { .. })));
    }
}

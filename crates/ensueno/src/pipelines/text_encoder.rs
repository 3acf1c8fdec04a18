//! The text side of a text-to-image pipeline: a tokenizer and the encoder
//! whose last hidden states the UNet cross-attends to.
//!
//! Two families are supported, as `model_index.json` names them:
//! - `CLIPTextModel` + `CLIPTokenizer` (Stable Diffusion 1.x/2.x; Radford et
//!   al., arXiv:2103.00020): prompts padded to 77 tokens, no attention mask.
//! - `BertModel` + `BertTokenizer(Fast)` (ensueno's own model, on the
//!   sentence encoder all-MiniLM-L6-v2; Devlin et al., arXiv:1810.04805):
//!   prompts padded to the tokenizer's `model_max_length`, with the attention
//!   mask when the encoder's config sets `use_attention_mask`.
//!
//! Both follow diffusers' `StableDiffusionPipeline.encode_prompt`: tokenize
//! with `padding="max_length", truncation=True`, run the encoder, take its
//! first output. A BERT encoder also gives the prompt's sentence embedding
//! (Reimers and Gurevych, arXiv:1908.10084), which a UNet with a class
//! embedding is fed.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::{PaddingStrategy, Tokenizer};

use crate::io::model_folder::{in_component, var_builder_from_files, ModelFolder};
use crate::models::bert::{BertConfig, BertModel};
use crate::models::clip_text_model::{CLIPTextConfig, CLIPTextModel};
use crate::models::clip_tokenizer::CLIPTokenizer;
use crate::models::sentence_encoder::{l2_normalize, pool, Pooling};
use crate::{Error, Result};

/// CLIP's context window: prompts are padded or truncated to it.
pub const CLIP_MAX_TOKENS: usize = 77;

/// A prompt encoder of either family.
// A pipeline holds one encoder, so the size gap between the variants costs
// nothing; boxing the CLIP fields would change the public variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum TextEncoder {
    Clip {
        tokenizer: CLIPTokenizer,
        model: CLIPTextModel,
    },
    Bert {
        tokenizer: Box<Tokenizer>,
        model: BertModel,
        /// Tokens per prompt, `[CLS]` and `[SEP]` included.
        max_length: usize,
        /// Pass the attention mask to BERT (diffusers does when the encoder's
        /// config has `use_attention_mask: true`).
        use_attention_mask: bool,
    },
}

/// The keys of a transformers `tokenizer_config.json` that matter here.
#[derive(Debug, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    model_max_length: Option<f64>,
}

/// The extra key diffusers reads from a BERT-like encoder's `config.json`.
#[derive(Debug, Deserialize)]
struct MaskFlag {
    #[serde(default)]
    use_attention_mask: bool,
}

impl TextEncoder {
    /// Loads the `tokenizer` and `text_encoder` components of a diffusers
    /// folder; the family comes from `model_index.json` (CLIP when it does
    /// not say).
    pub fn load(folder: &ModelFolder, device: &Device, dtype: DType) -> Result<Self> {
        let class = folder
            .component_class("text_encoder")
            .unwrap_or("CLIPTextModel");
        let text_dir = folder.component_dir("text_encoder")?;
        let tokenizer_dir = folder.component_dir("tokenizer")?;
        match class {
            "CLIPTextModel" | "CLIPTextModelWithProjection" => {
                let tokenizer = CLIPTokenizer::from_dir(&tokenizer_dir)?;
                let config = CLIPTextConfig::from_file(&folder.config_path("text_encoder")?)?;
                let vb = folder.var_builder("text_encoder", dtype, device)?;
                let model = in_component(&text_dir, CLIPTextModel::new(vb, &config))?;
                Ok(Self::Clip { tokenizer, model })
            }
            "BertModel" => {
                let config_path = folder.config_path("text_encoder")?;
                let max_length = tokenizer_max_length(&tokenizer_dir)?;
                let vb = folder.var_builder("text_encoder", dtype, device)?;
                Self::load_bert(&config_path, &tokenizer_dir, vb, max_length)
            }
            other => Err(Error::Model {
                path: text_dir,
                message: format!(
                    "unsupported text encoder class {other} (supported: CLIPTextModel, BertModel)"
                ),
            }),
        }
    }

    /// A BERT encoder from `dir` (`config.json` and the weights: a
    /// sentence-transformers or transformers folder) with the
    /// `tokenizer.json` of `tokenizer_dir` (often the same folder), prompts
    /// padded to `max_length` tokens and masked.
    pub fn bert_from_dir(
        dir: &Path,
        tokenizer_dir: &Path,
        max_length: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let files = in_component(dir, crate::io::model_folder::component_weight_files(dir))?;
        let vb = var_builder_from_files(&files, dtype, device)?;
        let mut encoder = Self::load_bert(&dir.join("config.json"), tokenizer_dir, vb, max_length)?;
        if let Self::Bert {
            use_attention_mask, ..
        } = &mut encoder
        {
            *use_attention_mask = true;
        }
        Ok(encoder)
    }

    fn load_bert(
        config_path: &Path,
        tokenizer_dir: &Path,
        vb: candle_nn::VarBuilder,
        max_length: usize,
    ) -> Result<Self> {
        let config = BertConfig::from_file(config_path)?;
        let flag: MaskFlag = crate::io::model_folder::read_json(config_path)?;
        if max_length < 3 || max_length > config.max_position_embeddings {
            return Err(Error::Config {
                path: tokenizer_dir.to_path_buf(),
                message: format!(
                    "model_max_length {max_length} must be between 3 and the encoder's max_position_embeddings ({})",
                    config.max_position_embeddings
                ),
            });
        }
        let tokenizer_path = tokenizer_dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::Model {
                path: tokenizer_path,
                message: "missing tokenizer.json (BERT tokenizers are read from it)".into(),
            });
        }
        let tokenizer = crate::models::sentence_encoder::load_tokenizer(
            &tokenizer_path,
            max_length,
            PaddingStrategy::Fixed(max_length),
        )?;
        let model = in_component(
            config_path.parent().unwrap_or(Path::new(".")),
            BertModel::new(vb, &config),
        )?;
        Ok(Self::Bert {
            tokenizer: Box::new(tokenizer),
            model,
            max_length,
            use_attention_mask: flag.use_attention_mask,
        })
    }

    /// Tokens per prompt.
    pub fn max_length(&self) -> usize {
        match self {
            Self::Clip { .. } => CLIP_MAX_TOKENS,
            Self::Bert { max_length, .. } => *max_length,
        }
    }

    /// Width of the hidden states (the UNet's `cross_attention_dim`).
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Clip { model, .. } => model.hidden_size(),
            Self::Bert { model, .. } => model.hidden_size(),
        }
    }

    /// Encodes prompts to hidden states `[B, max_length, D]`; the flags say
    /// which prompts were cut to fit. `clip_skip` skips CLIP's last layers
    /// (BERT encoders refuse anything but 0).
    pub fn encode(&self, prompts: &[&str], clip_skip: usize) -> Result<(Tensor, Vec<bool>)> {
        if prompts.is_empty() {
            return Err(Error::invalid("text encoder: no prompts given"));
        }
        match self {
            Self::Clip { tokenizer, model } => {
                let mut ids = Vec::with_capacity(prompts.len() * CLIP_MAX_TOKENS);
                let mut cut = Vec::with_capacity(prompts.len());
                for p in prompts {
                    let t = tokenizer.encode_padded(p, CLIP_MAX_TOKENS)?;
                    ids.extend(t.ids);
                    cut.push(t.truncated);
                }
                let device = model.device();
                let ids = Tensor::from_vec(ids, (prompts.len(), CLIP_MAX_TOKENS), device)?;
                Ok((model.forward_with_clip_skip(&ids, clip_skip)?, cut))
            }
            Self::Bert { .. } => {
                let (hidden, _, cut) = self.encode_bert(prompts, clip_skip)?;
                Ok((hidden, cut))
            }
        }
    }

    /// Encodes prompts to hidden states `[B, max_length, D]` and their mean
    /// over the real tokens `[B, D]` in f32: sentence-transformers'
    /// Pooling(mean), which Normalize scales into all-MiniLM-L6-v2's
    /// sentence vector (paraphrases land near each other there, which is
    /// what it was trained for). Left unnormalised it is at the scale of the
    /// token states themselves, so a cross-attention layer trained on token
    /// states takes it as one more token. BERT encoders only (which refuse a
    /// `clip_skip` but 0, as [`Self::encode`]).
    pub fn encode_with_mean_state(
        &self,
        prompts: &[&str],
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor, Vec<bool>)> {
        if prompts.is_empty() {
            return Err(Error::invalid("text encoder: no prompts given"));
        }
        let (hidden, mask, cut) = self.encode_bert(prompts, clip_skip)?;
        let mean = pool(&hidden, &mask, Pooling::Mean)?;
        Ok((hidden, mean, cut))
    }

    /// BERT hidden states, the attention mask and the truncation flags.
    fn encode_bert(
        &self,
        prompts: &[&str],
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor, Vec<bool>)> {
        let Self::Bert {
            tokenizer,
            model,
            max_length,
            use_attention_mask,
        } = self
        else {
            return Err(Error::invalid(
                "sentence embeddings need a BERT text encoder; this model uses CLIP",
            ));
        };
        if clip_skip != 0 {
            return Err(Error::invalid(
                "clip_skip only applies to CLIP text encoders; this model uses BERT",
            ));
        }
        let encodings = tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(prompts.len() * max_length);
        let mut mask = Vec::with_capacity(prompts.len() * max_length);
        let mut cut = Vec::with_capacity(prompts.len());
        for e in &encodings {
            if e.len() != *max_length {
                return Err(Error::Tokenizer(format!(
                    "padding gave {} tokens instead of {max_length}",
                    e.len()
                )));
            }
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
            cut.push(!e.get_overflowing().is_empty());
        }
        let device = model.device();
        let shape = (prompts.len(), *max_length);
        let ids = Tensor::from_vec(ids, shape, device)?;
        let mask = Tensor::from_vec(mask, shape, device)?;
        let hidden = model.forward(&ids, None, use_attention_mask.then_some(&mask))?;
        Ok((hidden, mask, cut))
    }
}

/// The class labels a UNet with a class embedding gets for a prompt, from
/// its mean token state ([`TextEncoder::encode_with_mean_state`]): the unit
/// sentence embedding times `sqrt(D)`, so that its entries have unit
/// variance (the scale a linear layer's default initialisation assumes)
/// rather than about `1/sqrt(D)`.
///
/// # Shapes
/// `[B, D]` -> `[B, D]`
pub fn sentence_class_labels(mean_state: &Tensor) -> Result<Tensor> {
    let d = mean_state.dim(candle_core::D::Minus1)?;
    Ok((l2_normalize(mean_state)? * (d as f64).sqrt())?)
}

/// `model_max_length` from a transformers tokenizer folder (512 when absent,
/// BERT's window).
fn tokenizer_max_length(dir: &Path) -> Result<usize> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(512);
    }
    let config: TokenizerConfig = crate::io::model_folder::read_json(&path)?;
    match config.model_max_length {
        None => Ok(512),
        // transformers writes a huge sentinel for "no limit".
        Some(v) if v >= 1e6 => Ok(512),
        Some(v) if v >= 1.0 && v.fract() == 0.0 => Ok(v as usize),
        Some(v) => Err(Error::Config {
            path,
            message: format!("model_max_length must be a positive integer, got {v}"),
        }),
    }
}

//! A sentence-transformers sentence encoder (e.g. all-MiniLM-L6-v2): WordPiece
//! tokenizer, BERT, pooling over the attention mask and optional L2
//! normalisation. Its token states condition a text-to-image model; its
//! sentence vectors serve retrieval and evaluation.
//!
//! Paper: Reimers, Gurevych, "Sentence-BERT: Sentence Embeddings using
//! Siamese BERT-Networks", 2019, arXiv:1908.10084.
//!
//! Reference implementation: sentence-transformers `models/Transformer.py`
//! (`tokenize`: padding to the longest, truncation "longest_first" at
//! `max_seq_length`), `models/Pooling.py` and `models/Normalize.py`, over
//! transformers' `BertModel` (see [`super::bert`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::bert::{BertConfig, BertModel};
use crate::io::model_folder::{
    component_weight_files, in_component, read_json, var_builder_from_files,
};
use crate::{Error, Result};

/// How token states become one sentence vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean of the unpadded token states.
    Mean,
    /// The first (`[CLS]`) token's state.
    Cls,
    /// Element-wise maximum over the unpadded tokens.
    Max,
    /// Sum of the unpadded token states divided by sqrt(token count).
    MeanSqrtLen,
}

/// The keys of sentence-transformers' `Pooling` config that we read.
#[derive(Debug, Clone, Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    /// Newer sentence-transformers write the mode as one string instead.
    pooling_mode: Option<String>,
}

impl PoolingConfig {
    fn mode(&self, path: &Path) -> Result<Pooling> {
        let config_err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        if let Some(mode) = &self.pooling_mode {
            return match mode.as_str() {
                "mean" => Ok(Pooling::Mean),
                "cls" => Ok(Pooling::Cls),
                "max" => Ok(Pooling::Max),
                "mean_sqrt_len_tokens" => Ok(Pooling::MeanSqrtLen),
                other => Err(config_err(format!(
                    "pooling_mode '{other}' is not supported (expected mean, cls, max or mean_sqrt_len_tokens)"
                ))),
            };
        }
        let modes: Vec<Pooling> = [
            (self.pooling_mode_mean_tokens, Pooling::Mean),
            (self.pooling_mode_cls_token, Pooling::Cls),
            (self.pooling_mode_max_tokens, Pooling::Max),
            (self.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
        ]
        .into_iter()
        .filter_map(|(on, m)| on.then_some(m))
        .collect();
        match modes.as_slice() {
            [one] => Ok(*one),
            [] => Err(config_err("no pooling mode is enabled".into())),
            _ => Err(config_err(
                "several pooling modes at once (concatenated vectors) are not supported".into(),
            )),
        }
    }
}

/// One entry of `modules.json`.
#[derive(Debug, Clone, Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// `sentence_bert_config.json`.
#[derive(Debug, Clone, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// A sentence-transformers model folder loaded for inference: tokenizer,
/// BERT, pooling and normalisation.
#[derive(Debug, Clone)]
pub struct SentenceEncoder {
    tokenizer: Tokenizer,
    model: BertModel,
    pooling: Pooling,
    normalize: bool,
    max_length: usize,
    lower_case: bool,
    device: Device,
}

impl SentenceEncoder {
    /// Loads a sentence-transformers folder with f32 weights (whatever the
    /// stored dtype). See [`Self::from_folder_with_dtype`].
    pub fn from_folder(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_folder_with_dtype(dir, DType::F32, device)
    }

    /// Loads a sentence-transformers folder: `config.json` (BERT),
    /// `tokenizer.json`, `model.safetensors`, `modules.json` (which says
    /// where the `Pooling` config is and whether a `Normalize` module
    /// follows) and, when present, `sentence_bert_config.json` (its
    /// `max_seq_length` caps the tokens per text; without it the cap is
    /// `max_position_embeddings`). Weights are converted to `dtype`.
    pub fn from_folder_with_dtype(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Model {
                path: dir.to_path_buf(),
                message: "no such folder (expected a sentence-transformers model folder)".into(),
            });
        }
        let required = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::Model {
                    path: p,
                    message: format!("missing file: a sentence-transformers folder needs {name}"),
                })
            }
        };

        let config = BertConfig::from_file(&required("config.json")?)?;

        let modules_path = required("modules.json")?;
        let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
        let has = |suffix: &str| modules.iter().find(|m| m.kind.ends_with(suffix));
        if has("models.Transformer").is_none() {
            return Err(Error::Config {
                path: modules_path,
                message: "no sentence_transformers.models.Transformer module".into(),
            });
        }
        let pooling = match has("models.Pooling") {
            Some(m) => {
                let sub = safe_subdir(&m.path, &modules_path)?;
                let path = dir.join(sub).join("config.json");
                if !path.is_file() {
                    return Err(Error::Model {
                        path,
                        message: "missing pooling config named by modules.json".into(),
                    });
                }
                let pc: PoolingConfig = read_json(&path)?;
                if let Some(dim) = pc.word_embedding_dimension {
                    if dim != config.hidden_size {
                        return Err(Error::Config {
                            path,
                            message: format!(
                                "word_embedding_dimension {dim} differs from the model's hidden_size {}",
                                config.hidden_size
                            ),
                        });
                    }
                }
                pc.mode(&path)?
            }
            // sentence-transformers adds mean pooling when a folder has none.
            None => Pooling::Mean,
        };
        let normalize = has("models.Normalize").is_some();

        let sbert_path = dir.join("sentence_bert_config.json");
        let sbert: Option<SentenceBertConfig> = if sbert_path.is_file() {
            Some(read_json(&sbert_path)?)
        } else {
            None
        };
        let max_length = sbert
            .as_ref()
            .and_then(|s| s.max_seq_length)
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        if max_length < 3 {
            return Err(Error::Config {
                path: sbert_path,
                message: format!(
                    "max_seq_length {max_length} leaves no room for text between [CLS] and [SEP]"
                ),
            });
        }
        let lower_case = sbert.as_ref().is_some_and(|s| s.do_lower_case);

        let tokenizer_path = required("tokenizer.json")?;
        let tokenizer = load_tokenizer(&tokenizer_path, max_length, PaddingStrategy::BatchLongest)?;

        let files = in_component(dir, component_weight_files(dir))?;
        let vb = var_builder_from_files(&files, dtype, device)?;
        let model = in_component(dir, BertModel::new(vb, &config))?;
        Ok(Self {
            tokenizer,
            model,
            pooling,
            normalize,
            max_length,
            lower_case,
            device: device.clone(),
        })
    }

    /// The BERT model.
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// Width of the token states and sentence vectors.
    pub fn hidden_size(&self) -> usize {
        self.model.hidden_size()
    }

    /// Most tokens per text, `[CLS]` and `[SEP]` included; longer texts are cut.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Whether sentence vectors are L2-normalised.
    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// The pooling mode.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Tokenizes a batch, padded to its longest text and truncated to
    /// [`Self::max_length`] tokens. Any string works (empty: just `[CLS]
    /// [SEP]`; characters outside the vocabulary become `[UNK]`).
    ///
    /// # Shapes
    /// returns (`input_ids` u32 [B, T], `attention_mask` u32 [B, T]),
    /// T <= `max_length`
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        if texts.is_empty() {
            return Err(Error::invalid("sentence encoder: no texts given"));
        }
        let inputs: Vec<String> = texts
            .iter()
            .map(|t| {
                // sentence-transformers strips; lowers only when its config says so.
                let t = t.trim();
                if self.lower_case {
                    t.to_lowercase()
                } else {
                    t.to_string()
                }
            })
            .collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let b = encodings.len();
        let t = encodings.first().map_or(0, |e| e.len());
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for e in &encodings {
            if e.len() != t {
                return Err(Error::Tokenizer(format!(
                    "batch padding gave rows of {} and {t} tokens",
                    e.len()
                )));
            }
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        Ok((
            Tensor::from_vec(ids, (b, t), &self.device)?,
            Tensor::from_vec(mask, (b, t), &self.device)?,
        ))
    }

    /// The last hidden state of a batch: what a text-to-image model
    /// cross-attends to, with the mask that tells text from padding.
    ///
    /// # Shapes
    /// returns (`hidden` [B, T, hidden] in the weights' dtype,
    /// `attention_mask` u32 [B, T])
    pub fn encode_tokens(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let (ids, mask) = self.tokenize(texts)?;
        let hidden = self.model.forward(&ids, None, Some(&mask))?;
        Ok((hidden, mask))
    }

    /// Sentence vectors: pooled token states, L2-normalised when the folder
    /// has a `Normalize` module (all-MiniLM-L6-v2 does, so cosine similarity
    /// is a dot product).
    ///
    /// # Shapes
    /// returns f32 [B, hidden]
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        let (hidden, mask) = self.encode_tokens(texts)?;
        let pooled = pool(&hidden, &mask, self.pooling)?;
        if self.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }
}

/// Reads `tokenizer.json` and replaces its padding and truncation (the
/// MiniLM file pads every text to a fixed 128) with sentence-transformers':
/// pad to the batch's longest, cut at `max_length`.
/// A `tokenizer.json` set to truncate at `max_length` tokens and pad with
/// `padding` (its own pad token, else `[PAD]`).
pub(crate) fn load_tokenizer(
    path: &Path,
    max_length: usize,
    padding: PaddingStrategy,
) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let (pad_id, pad_token) = match tokenizer.get_padding() {
        Some(p) => (p.pad_id, p.pad_token.clone()),
        None => {
            let token = "[PAD]".to_string();
            let id = tokenizer.token_to_id(&token).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no padding settings and no [PAD] token",
                    path.display()
                ))
            })?;
            (id, token)
        }
    };
    tokenizer.with_padding(Some(PaddingParams {
        strategy: padding,
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token,
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    Ok(tokenizer)
}

/// A sub-folder named in `modules.json`, kept inside the model folder.
fn safe_subdir<'a>(sub: &'a str, modules_path: &Path) -> Result<&'a str> {
    if sub.contains("..") || Path::new(sub).is_absolute() {
        return Err(Error::Config {
            path: modules_path.to_path_buf(),
            message: format!("module path '{sub}' leaves the model folder"),
        });
    }
    Ok(sub)
}

/// Pools token states over the attention mask, in f32.
///
/// # Shapes
/// `hidden` [B, T, H], `attention_mask` [B, T] (1 = token, 0 = padding,
/// any numeric dtype) -> f32 [B, H]
pub fn pool(hidden: &Tensor, attention_mask: &Tensor, pooling: Pooling) -> Result<Tensor> {
    let (b, t, _h) = hidden.dims3()?;
    if attention_mask.dims() != [b, t] {
        return Err(Error::Shape {
            what: "pooling attention_mask".to_string(),
            expected: format!("[{b}, {t}]"),
            got: format!("{:?}", attention_mask.dims()),
        });
    }
    let hidden = hidden.to_dtype(DType::F32)?;
    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    // As sentence-transformers: counts clamped at 1e-9 so an all-padding row gives zeros.
    let counts = || -> Result<Tensor> { Ok(mask.sum(1)?.clamp(1e-9f32, f32::MAX)?) };
    Ok(match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => hidden
            .broadcast_mul(&mask)?
            .sum(1)?
            .broadcast_div(&counts()?)?,
        Pooling::MeanSqrtLen => hidden
            .broadcast_mul(&mask)?
            .sum(1)?
            .broadcast_div(&counts()?.sqrt()?)?,
        Pooling::Max => {
            // Padded positions get -1e9 so they never win, as in sentence-transformers.
            let fill = ((mask.ones_like()? - &mask)? * -1e9)?;
            hidden.broadcast_mul(&mask)?.broadcast_add(&fill)?.max(1)?
        }
    })
}

/// `x / max(|x|_2, 1e-12)` along the last dimension (torch's
/// `F.normalize(p=2)`, which sentence-transformers' `Normalize` calls).
///
/// # Shapes
/// [B, H] -> [B, H]
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    Ok(xs.broadcast_div(&norm)?)
}

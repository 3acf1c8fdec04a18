//! CLIP: a text tower and an image tower projected into one embedding space,
//! trained so that an image and its caption land close together (symmetric
//! InfoNCE over a batch of pairs).
//!
//! Paper: Radford, Kim, Hallacy, Ramesh, Goh, Agarwal, Sastry, Askell,
//! Mishkin, Clark, Krueger, Sutskever, "Learning Transferable Visual Models
//! From Natural Language Supervision", 2021, arXiv:2103.00020. The loss is
//! the InfoNCE of van den Oord, Li, Vinyals, "Representation Learning with
//! Contrastive Predictive Coding", 2018, arXiv:1807.03748, in both directions.
//!
//! Reference implementation: transformers `models/clip/modeling_clip.py`
//! (`CLIPModel`, `get_text_features`, `get_image_features`, `clip_loss`) and
//! `configuration_clip.py` (`CLIPConfig`). The safetensors layout is
//! `CLIPModel`'s: `text_model.*`, `vision_model.*`, `text_projection.weight`,
//! `visual_projection.weight`, `logit_scale`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::clip_text_model::{CLIPTextConfig, CLIPTextModel};
use super::clip_vision_model::{CLIPVisionConfig, CLIPVisionTransformer};
use crate::ops::linear::{linear_b, Linear};
use crate::{Error, Result};

fn default_projection_dim() -> usize {
    512
}
/// ln(1 / 0.07): the initial temperature of the paper.
fn default_logit_scale_init_value() -> f64 {
    2.6592
}

/// transformers' `CLIPConfig`, read from a `CLIPModel`'s `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CLIPConfig {
    #[serde(default)]
    pub text_config: CLIPTextConfig,
    #[serde(default)]
    pub vision_config: CLIPVisionConfig,
    /// Width of the shared embedding space.
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// Initial log of the logits' scale (the inverse temperature).
    #[serde(default = "default_logit_scale_init_value")]
    pub logit_scale_init_value: f64,
}

impl CLIPConfig {
    /// Reads and checks a transformers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        self.text_config.validate()?;
        self.vision_config.validate()?;
        super::config_defaults::check_positive("CLIP", &[("projection_dim", self.projection_dim)])?;
        if !self.logit_scale_init_value.is_finite() {
            return Err(Error::invalid(
                "CLIP config: logit_scale_init_value must be a finite number",
            ));
        }
        Ok(())
    }

    /// The `config.json` transformers writes for a `CLIPModel`, with the
    /// keys it needs to load the folder as one.
    pub fn to_transformers_json(&self) -> Result<serde_json::Value> {
        let mut v = crate::train::to_json(self)?;
        if let Some(map) = v.as_object_mut() {
            map.insert("architectures".into(), serde_json::json!(["CLIPModel"]));
            map.insert("model_type".into(), serde_json::json!("clip"));
            map.insert("dtype".into(), serde_json::json!("float32"));
        }
        for (key, kind) in [
            ("text_config", "clip_text_model"),
            ("vision_config", "clip_vision_model"),
        ] {
            if let Some(sub) = v.get_mut(key).and_then(|s| s.as_object_mut()) {
                sub.insert("model_type".into(), serde_json::json!(kind));
            }
        }
        Ok(v)
    }
}

/// The two towers, their projections and the learned temperature
/// (transformers `CLIPModel`).
#[derive(Debug, Clone)]
pub struct CLIPModel {
    text_model: CLIPTextModel,
    vision_model: CLIPVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    logit_scale: Tensor,
}

impl CLIPModel {
    /// Builds the model from a `VarBuilder` at the checkpoint root.
    pub fn new(vb: VarBuilder, config: &CLIPConfig) -> Result<Self> {
        config.validate()?;
        let p = config.projection_dim;
        Ok(Self {
            text_model: CLIPTextModel::new(vb.pp("text_model"), &config.text_config)?,
            vision_model: CLIPVisionTransformer::new(vb.pp("vision_model"), &config.vision_config)?,
            text_projection: linear_b(
                config.text_config.hidden_size,
                p,
                false,
                vb.pp("text_projection"),
            )?,
            visual_projection: linear_b(
                config.vision_config.hidden_size,
                p,
                false,
                vb.pp("visual_projection"),
            )?,
            logit_scale: vb.get_with_hints(
                (),
                "logit_scale",
                Init::Const(config.logit_scale_init_value),
            )?,
        })
    }

    /// The text tower (for the hidden states a UNet cross-attends to).
    pub fn text_model(&self) -> &CLIPTextModel {
        &self.text_model
    }

    pub fn device(&self) -> &Device {
        self.logit_scale.device()
    }

    /// transformers' `get_text_features`: the pooled text state, projected
    /// (not normalised).
    ///
    /// # Shapes
    /// `input_ids` u32 [B, T] -> [B, projection_dim]
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text_model.forward(input_ids)?;
        let pooled = self.text_model.pooled_output(&hidden, input_ids)?;
        Ok(self.text_projection.forward(&pooled)?)
    }

    /// transformers' `get_image_features`: the pooled class token,
    /// projected (not normalised).
    ///
    /// # Shapes
    /// `pixel_values` [B, C, S, S] (normalised as the model's image processor
    /// says) -> [B, projection_dim]
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, pooled) = self.vision_model.forward(pixel_values)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// The scaled cosine similarities `logits_per_text` (row: text, column:
    /// image), as `CLIPModel.forward` returns them.
    ///
    /// # Shapes
    /// `text_embeds` [Bt, P], `image_embeds` [Bi, P] -> [Bt, Bi]
    pub fn logits_per_text(&self, text_embeds: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let t = l2_normalize(text_embeds)?;
        let i = l2_normalize(image_embeds)?;
        let scale = self.logit_scale.to_dtype(DType::F32)?.exp()?;
        Ok(t.matmul(&i.t()?)?.broadcast_mul(&scale)?)
    }
}

/// Each row divided by its Euclidean norm.
///
/// # Shapes
/// `[B, P]` -> `[B, P]`
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(xs.broadcast_div(&norm)?)
}

/// CLIP's symmetric contrastive loss over a square matrix of logits (row i:
/// text i, column j: image j): the mean of the cross-entropy over each row
/// (which image goes with this text) and over each column (which text goes
/// with this image). Pair i's positives are the columns j with
/// `group[j] == group[i]`, weighted equally: with one pair per group this is
/// transformers' `clip_loss` exactly; a batch that holds one caption twice
/// (the same emoji in two art styles) then does not push the two apart.
///
/// # Shapes
/// `logits_per_text` [B, B], `group` of length B -> scalar
pub fn contrastive_loss(logits_per_text: &Tensor, group: &[usize]) -> Result<Tensor> {
    let (b, b2) = logits_per_text.dims2()?;
    if b != b2 || group.len() != b {
        return Err(Error::Shape {
            what: "contrastive loss logits".to_string(),
            expected: format!("[{}, {}]", group.len(), group.len()),
            got: format!("{:?}", logits_per_text.dims()),
        });
    }
    let mut targets = vec![0f32; b * b];
    for i in 0..b {
        let n = group.iter().filter(|&&g| g == group[i]).count() as f32;
        for j in 0..b {
            if group[j] == group[i] {
                targets[i * b + j] = 1.0 / n;
            }
        }
    }
    // Symmetric, so it serves both directions.
    let targets = Tensor::from_vec(targets, (b, b), logits_per_text.device())?;
    let ce = |logits: &Tensor| -> Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        Ok((logp * &targets)?.sum(D::Minus1)?.neg()?.mean_all()?)
    };
    let text_loss = ce(logits_per_text)?;
    let image_loss = ce(&logits_per_text.t()?)?;
    Ok(((text_loss + image_loss)? * 0.5)?)
}

//! `ensueno train clip`: a CLIP trained from scratch on captioned images
//! (the emoji sets), with the symmetric contrastive loss, saved as a
//! transformers `CLIPModel` folder that transformers loads as it is.
//!
//! Recipe (Radford et al., arXiv:2103.00020, scaled down): both towers and
//! the temperature trained from random weights with AdamW, linear warm-up,
//! the logit scale clamped to ln 100 as the paper does. Each image is paired
//! with its caption, naming the image's art style (`"grinning face, noto
//! style"`) with probability `style_prob`, so that the text tower learns the
//! styles and the captions both. A batch that holds one caption twice (the
//! same emoji drawn in two styles, neither named) counts both images as
//! positives of that caption ([`contrastive_loss`]).
//!
//! After the epochs the recipe names, the zero-shot retrieval of every
//! training caption is scored against all the images of its style
//! (`zero_shot.json`); `ensueno eval clip` scores held-out paraphrases.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::forward_process::warmup_lr;
use super::text2image::{check_style_template, style_name, RunDefaults};
use super::{prefixed, strip_prefix, Batch, EpochContext, ParamStore, StepContext, TrainTask};
use crate::data::ImageDataset;
use crate::eval::retrieval::{CaseKind, RetrievalCase};
use crate::eval::zero_shot::{trim_padding, ClipZeroShot, ImageNormalization, ZeroShotScore};
use crate::io::atomic::write_json;
use crate::models::clip_model::{contrastive_loss, CLIPConfig, CLIPModel};
use crate::models::clip_tokenizer::CLIPTokenizer;
use crate::ops::adamw::AdamW;
use crate::{Error, Result};
use candle_nn::{Optimizer, ParamsAdamW};

/// OpenAI CLIP's image normalisation (transformers' `OPENAI_CLIP_MEAN`/`_STD`).
pub const OPENAI_CLIP_NORMALIZATION: ImageNormalization = ImageNormalization {
    mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
    std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
};

/// A committed training config (`configs/clip-emoji.json`): the model, the
/// recipe and the run's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipTrainConfig {
    pub model: CLIPConfig,
    pub recipe: ClipRecipe,
    pub training: RunDefaults,
}

/// Everything about training besides the model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipRecipe {
    /// Probability of naming the image's style in its caption.
    pub style_prob: f64,
    /// How a style is named: `"{caption}, {style} style"`.
    pub style_template: String,
    /// Tokens per caption in training, start and end of text included (at
    /// most the text tower's `max_position_embeddings`). Attention is causal
    /// and the caption's embedding is read at its end-of-text token, so
    /// padding further, as inference does to 77, gives the same embedding.
    pub max_text_tokens: usize,
    pub weight_decay: f64,
    pub lr_warmup_steps: usize,
    /// The colour transparent pixels are composited on.
    pub background: [u8; 3],
    /// Score zero-shot retrieval after every this many epochs (and after the
    /// last); 0: after the last only.
    #[serde(default)]
    pub eval_every: usize,
}

impl ClipTrainConfig {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let r = &self.recipe;
        if !(0.0..=1.0).contains(&r.style_prob) {
            return Err(Error::invalid("style_prob must be in [0, 1]"));
        }
        check_style_template(&r.style_template)?;
        let max_pos = self.model.text_config.max_position_embeddings;
        if r.max_text_tokens < 3 || r.max_text_tokens > max_pos {
            return Err(Error::invalid(format!(
                "max_text_tokens must be between 3 and the text tower's max_position_embeddings ({max_pos})"
            )));
        }
        if !(r.weight_decay >= 0.0 && r.weight_decay.is_finite()) {
            return Err(Error::invalid("weight_decay must be a finite number >= 0"));
        }
        if self.model.vision_config.num_channels != 3 {
            return Err(Error::invalid(
                "the vision tower must take 3 channels (RGB images)",
            ));
        }
        self.training.validate("clip")
    }
}

impl ClipRecipe {
    /// How the training images are loaded: composited on the background and
    /// resized to the vision tower's input.
    pub fn load_options(&self, image_size: usize) -> crate::data::LoadOptions {
        crate::data::LoadOptions {
            background: self.background,
            size: Some((image_size, image_size)),
            ..crate::data::LoadOptions::default()
        }
    }

    /// The caption with the style named.
    pub fn styled(&self, caption: &str, style: &str) -> String {
        self.style_template
            .replace("{caption}", caption)
            .replace("{style}", style)
    }
}

/// The largest logit scale, ln 100, as the paper clamps it.
const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

/// A CLIP and its optimiser.
pub struct ClipTask {
    config: ClipTrainConfig,
    tokenizer_dir: PathBuf,
    tokenizer: CLIPTokenizer,
    params: ParamStore,
    model: CLIPModel,
    /// The temperature's variable, clamped after each step.
    logit_scale: Var,
    opt: AdamW,
    base_lr: f64,
    /// Per sample: token ids of the plain and of the styled caption.
    plain_ids: Vec<Vec<u32>>,
    styled_ids: Vec<Vec<u32>>,
    /// Per sample: the plain caption's group, and the styled one's.
    plain_group: Vec<usize>,
    styled_group: Vec<usize>,
    styles: Vec<String>,
    /// The training data, kept for the zero-shot scores (images as `u8`).
    data: ImageDataset,
    last_scores: Vec<ZeroShotScore>,
    device: Device,
}

impl ClipTask {
    /// Tokenizes every caption and initialises the model (weights seeded by
    /// `seed`). `tokenizer_dir` holds CLIP's `vocab.json` and `merges.txt`.
    pub fn new(
        config: ClipTrainConfig,
        tokenizer_dir: &Path,
        data: &ImageDataset,
        lr: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let recipe = &config.recipe;
        let captions = data.captions.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "{}: CLIP training needs captions (KEY.txt in the tars, or .txt sidecars)",
                data.name
            ))
        })?;
        let size = config.model.vision_config.image_size;
        if data.channels != 3 || data.height != size || data.width != size {
            return Err(Error::invalid(format!(
                "CLIP training needs {size}x{size} RGB images (the vision tower's image_size), got {}x{}x{}",
                data.channels, data.height, data.width
            )));
        }
        let tokenizer = CLIPTokenizer::from_dir(tokenizer_dir)?;
        let vocab = config.model.text_config.vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(Error::invalid(format!(
                "the tokenizer has {} tokens but the text tower's vocab_size is {vocab}",
                tokenizer.vocab_size()
            )));
        }
        if config.model.text_config.eos_token_id != Some(tokenizer.eos_id()) {
            return Err(Error::invalid(format!(
                "the text tower's eos_token_id ({:?}) must be the tokenizer's end-of-text id ({}): \
                 the caption's embedding is read there",
                config.model.text_config.eos_token_id,
                tokenizer.eos_id()
            )));
        }
        let mut styles: Vec<String> = data.sources.iter().map(|s| style_name(s)).collect();
        styles.sort();
        styles.dedup();
        let mut groups: HashMap<String, usize> = HashMap::new();
        let mut group_of = |text: &str| {
            let n = groups.len();
            *groups.entry(text.to_string()).or_insert(n)
        };
        let len = recipe.max_text_tokens;
        let (mut plain_ids, mut styled_ids) = (Vec::new(), Vec::new());
        let (mut plain_group, mut styled_group) = (Vec::new(), Vec::new());
        for (i, caption) in captions.iter().enumerate().take(data.len()) {
            let caption = caption.trim();
            let style = data
                .sources
                .get(i)
                .map(|s| style_name(s))
                .unwrap_or_default();
            let styled = if style.is_empty() {
                caption.to_string()
            } else {
                recipe.styled(caption, &style)
            };
            plain_ids.push(tokenizer.encode_padded(caption, len)?.ids);
            styled_ids.push(tokenizer.encode_padded(&styled, len)?.ids);
            plain_group.push(group_of(caption));
            styled_group.push(group_of(&styled));
        }

        let params = ParamStore::new(seed);
        let model = CLIPModel::new(params.var_builder(DType::F32, device), &config.model)?;
        let logit_scale = params
            .vars()
            .into_iter()
            .find(|(name, _)| name == "logit_scale")
            .map(|(_, v)| v)
            .ok_or_else(|| Error::invalid("the CLIP model has no logit_scale"))?;
        let opt = params.adamw(ParamsAdamW {
            lr,
            weight_decay: recipe.weight_decay,
            ..ParamsAdamW::default()
        })?;
        Ok(Self {
            config,
            tokenizer_dir: tokenizer_dir.to_path_buf(),
            tokenizer,
            params,
            model,
            logit_scale,
            opt,
            base_lr: lr,
            plain_ids,
            styled_ids,
            plain_group,
            styled_group,
            styles,
            data: data.clone(),
            last_scores: Vec::new(),
            device: device.clone(),
        })
    }

    pub fn num_parameters(&self) -> usize {
        self.params.num_parameters()
    }

    pub fn styles(&self) -> &[String] {
        &self.styles
    }

    /// The zero-shot scores of the last evaluation (after the last epoch).
    pub fn last_scores(&self) -> &[ZeroShotScore] {
        &self.last_scores
    }

    /// Every training caption (plain, and with its style named) against all
    /// the images of its style.
    fn zero_shot(&self) -> Result<Vec<ZeroShotScore>> {
        let captions = self.data.captions.as_deref().unwrap_or(&[]);
        let cases: Vec<RetrievalCase> = (0..self.data.len())
            .map(|i| RetrievalCase {
                index: i,
                key: self.data.keys[i].clone(),
                text: captions[i].trim().to_string(),
                style: style_name(&self.data.sources[i]),
                kind: CaseKind::Caption,
            })
            .collect();
        // A copy of the weights that autograd does not track: evaluated
        // through the variables, every chunk's embeddings would keep its
        // whole graph of activations alive (gigabytes over the data set).
        let weights = self
            .params
            .tensors()
            .into_iter()
            .map(|(k, t)| (k, t.detach()))
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &self.device);
        let model = CLIPModel::new(vb, &self.config.model)?;
        let eval = ClipZeroShot {
            model: &model,
            tokenizer: &self.tokenizer,
            max_tokens: self.config.recipe.max_text_tokens,
            norm: OPENAI_CLIP_NORMALIZATION,
        };
        let recipe = &self.config.recipe;
        eval.evaluate(&self.data, &cases, &|s| style_name(s), &|c| {
            recipe.styled(&c.text, &c.style)
        })
    }
}

impl TrainTask for ClipTask {
    fn kind(&self) -> &str {
        "clip"
    }

    fn loss_names(&self) -> Vec<String> {
        vec!["loss".to_string(), "logit_scale".to_string()]
    }

    fn config(&self) -> serde_json::Value {
        super::model_and_recipe("model", &self.config.model, &self.config.recipe)
    }

    fn train_step(&mut self, batch: &Batch, ctx: &StepContext) -> Result<Vec<f64>> {
        let b = batch.indices.len();
        let mut coin = ctx.uniform_rng(0);
        let mut rows = Vec::with_capacity(b);
        let mut group = Vec::with_capacity(b);
        for &i in &batch.indices {
            if coin.random::<f64>() < self.config.recipe.style_prob {
                rows.push(self.styled_ids[i].clone());
                group.push(self.styled_group[i]);
            } else {
                rows.push(self.plain_ids[i].clone());
                group.push(self.plain_group[i]);
            }
        }
        // Padding after the batch's longest caption changes no embedding.
        let rows = trim_padding(rows, self.tokenizer.eos_id());
        let len = rows.first().map_or(0, Vec::len);
        let ids = Tensor::from_vec(rows.concat(), (b, len), &self.device)?;
        let pixels = OPENAI_CLIP_NORMALIZATION.apply(&batch.images.to_device(&self.device)?)?;
        let text = self.model.text_features(&ids)?;
        let image = self.model.image_features(&pixels)?;
        let logits = self.model.logits_per_text(&text, &image)?;
        let loss = contrastive_loss(&logits, &group)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Ok(vec![value, f64::NAN]);
        }
        let lr = warmup_lr(self.base_lr, ctx.step, self.config.recipe.lr_warmup_steps);
        self.opt.set_learning_rate(lr);
        let grads = loss.backward()?;
        self.opt.step(&grads)?;
        let s = self.logit_scale.as_tensor().to_scalar::<f32>()? as f64;
        if s > MAX_LOGIT_SCALE {
            self.logit_scale
                .set(&Tensor::new(MAX_LOGIT_SCALE as f32, &self.device)?)?;
        }
        Ok(vec![value, s.min(MAX_LOGIT_SCALE)])
    }

    fn end_of_epoch(&mut self, ctx: &EpochContext) -> Result<()> {
        let every = self.config.recipe.eval_every;
        let due = ctx.is_last() || (every > 0 && (ctx.epoch + 1).is_multiple_of(every));
        if !due {
            return Ok(());
        }
        let scores = self.zero_shot()?;
        let dir = ctx.output.join("zero_shot");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        write_json(
            &dir.join(format!("epoch-{:03}.json", ctx.epoch + 1)),
            &scores,
        )?;
        self.last_scores = scores;
        Ok(())
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        save_clip_folder(
            dir,
            &self.config,
            &self.tokenizer_dir,
            &self.params.tensors(),
        )
    }

    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.params.state("model.");
        out.extend(prefixed("optimizer.", self.opt.state()?));
        Ok(out)
    }

    fn load_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.params.load_tensors(state, "model.")?;
        self.opt.load_state(&strip_prefix("optimizer.", state))
    }
}

/// Writes a transformers `CLIPModel` folder: `config.json`,
/// `model.safetensors`, the tokenizer (`vocab.json`, `merges.txt`,
/// `tokenizer_config.json`, `special_tokens_map.json`), the image processor
/// (`preprocessor_config.json`) and ensueno's `clip_training.json` (the
/// recipe: how captions name styles, the training text length).
pub fn save_clip_folder(
    dir: &Path,
    config: &ClipTrainConfig,
    tokenizer_dir: &Path,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    write_json(
        &dir.join("config.json"),
        &config.model.to_transformers_json()?,
    )?;
    crate::io::weights::save_safetensors(&dir.join("model.safetensors"), tensors, None)?;
    for name in ["vocab.json", "merges.txt"] {
        let from = tokenizer_dir.join(name);
        let to = dir.join(name);
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
    }
    let max_len = config.model.text_config.max_position_embeddings;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_len,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "do_lower_case": true,
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &serde_json::json!({
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        }),
    )?;
    let size = config.model.vision_config.image_size;
    let norm = OPENAI_CLIP_NORMALIZATION;
    write_json(
        &dir.join("preprocessor_config.json"),
        &serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": true,
            "size": {"shortest_edge": size},
            "resample": 3,
            "do_center_crop": true,
            "crop_size": {"height": size, "width": size},
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": norm.mean,
            "image_std": norm.std,
            "do_convert_rgb": true,
        }),
    )?;
    write_json(&dir.join("clip_training.json"), &config.recipe)
}

/// A CLIP folder written by [`save_clip_folder`] (or any transformers
/// `CLIPModel` folder with a CLIP BPE tokenizer), loaded for evaluation.
pub struct LoadedClip {
    pub model: CLIPModel,
    pub tokenizer: CLIPTokenizer,
    pub config: CLIPConfig,
    /// How its captions named styles, when ensueno trained it.
    pub recipe: Option<ClipRecipe>,
}

impl LoadedClip {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = CLIPConfig::from_file(&dir.join("config.json"))?;
        let files = crate::io::model_folder::in_component(
            dir,
            crate::io::model_folder::component_weight_files(dir),
        )?;
        let vb = crate::io::model_folder::var_builder_from_files(&files, DType::F32, device)?;
        let model = crate::io::model_folder::in_component(dir, CLIPModel::new(vb, &config))?;
        let tokenizer = CLIPTokenizer::from_dir(dir)?;
        let recipe_path = dir.join("clip_training.json");
        let recipe = if recipe_path.is_file() {
            Some(crate::io::model_folder::read_json(&recipe_path)?)
        } else {
            None
        };
        Ok(Self {
            model,
            tokenizer,
            config,
            recipe,
        })
    }
}

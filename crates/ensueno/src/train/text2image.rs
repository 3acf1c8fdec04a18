//! Latent text-to-image diffusion training (`ensueno train text2image`):
//! Stable Diffusion's architecture at emoji scale. A frozen text encoder
//! (the sentence encoder all-MiniLM-L6-v2, a BERT) gives token states, a
//! frozen TAESD encoder gives 8x-downsampled latents, and a
//! `UNet2DConditionModel` learns to predict the noise of the DDPM forward
//! process while cross-attending to the text; prompts are dropped at random
//! so the same model also predicts unconditionally (classifier-free
//! guidance). The art style is part of the prompt ("..., noto style"), and
//! is itself dropped at random so prompts without a style work too.
//!
//! Latent diffusion: Rombach et al. 2022 (arXiv:2112.10752); DDPM: Ho et
//! al. 2020 (arXiv:2006.11239); classifier-free guidance: Ho & Salimans
//! 2022 (arXiv:2207.12598); TAESD: madebyollin/taesd. The recipe follows
//! diffusers' `examples/text_to_image/train_text_to_image.py` (epsilon MSE,
//! AdamW, EMA) and the result is saved as a diffusers
//! `StableDiffusionPipeline` folder (text_encoder `BertModel`, vae
//! `AutoencoderTiny`) that diffusers loads as it is.
//!
//! Both frozen encoders run once, before the first step: every training
//! image's latents and every distinct prompt's token states are kept in
//! memory, so a step costs only the UNet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::forward_process::{warmup_lr, with_diffusers_class, ForwardProcess};
use super::{prefixed, strip_prefix, Batch, Ema, EpochContext, ParamStore, StepContext, TrainTask};
use crate::data::caption_dropout::caption_variants;
use crate::data::ImageDataset;
use crate::io::atomic::write_json;
use crate::models::autoencoder_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use crate::models::clip_text_model::{CLIPTextConfig, CLIPTextModel};
use crate::models::clip_tokenizer::CLIPTokenizer;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::ops::adamw::AdamW;
pub use crate::pipelines::prompting::{styled_prompt, PromptingConfig, PROMPTING_JSON};
use crate::pipelines::text_encoder::{sentence_class_labels, TextEncoder};
use crate::schedulers::SchedulerConfig;
use crate::{Error, Result};

/// A committed training config (`configs/text2image-emoji.json`, and
/// `configs/text2image-emoji-stage2.json` for the GPU stage that continues
/// from it with `--init-unet`): the UNet, the recipe and the run's defaults,
/// so that the files reproduce the shipped model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Text2ImageConfig {
    pub unet: UNet2DConditionConfig,
    pub recipe: Text2ImageRecipe,
    pub training: RunDefaults,
}

/// Epochs, batch size, learning rate and seed of the reference run (the
/// CLI's flags override them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunDefaults {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

/// Everything about training besides the UNet's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Text2ImageRecipe {
    pub num_train_timesteps: usize,
    pub beta_schedule: String,
    pub beta_start: f64,
    pub beta_end: f64,
    /// Probability of training on the empty prompt (classifier-free guidance).
    pub cond_dropout: f64,
    /// Probability of leaving the style out of the prompt.
    pub style_dropout: f64,
    /// For a UNet fed the prompt's sentence embedding (as its class
    /// embedding, or as the sentence token): probability of giving it the
    /// empty prompt's token states with the prompt's sentence embedding, so
    /// that it learns to draw from the sentence embedding alone, the part of
    /// the text conditioning that places paraphrases near each other.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token_dropout: f64,
    /// Append one token to the text the UNet cross-attends to: the mean of
    /// the prompt's token states (its sentence embedding before
    /// normalisation). Saved in the model's `prompting.json`, so that
    /// `ensueno generate` conditions the same way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sentence_token: bool,
    /// Standard deviation of the Gaussian noise added to each entry of the
    /// sentence token in training (the entries themselves vary with a
    /// standard deviation of about 0.3 across all-MiniLM-L6-v2's captions).
    /// Noise augmentation of the conditioning embedding, as Stable unCLIP
    /// does for its image embedding: the UNet must draw the same image from
    /// a neighbourhood of the prompt's embedding, where a paraphrase lands,
    /// rather than from the exact vector.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sentence_token_noise: f64,
    /// Probability of training a step on a shorter wording of the image's
    /// caption instead of the caption itself: one of `caption_variants`
    /// wordings made once, before training, by leaving each word out with
    /// probability `caption_word_dropout`
    /// ([`crate::data::caption_dropout`]). People name an emoji with part
    /// of its caption's words ("black joker" for "playing card black
    /// joker"); this teaches the UNet to draw from part of a caption.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub caption_variant_prob: f64,
    /// Wordings made per caption (fewer for captions of few words).
    #[serde(default, skip_serializing_if = "is_zero_count")]
    pub caption_variants: usize,
    /// Probability of leaving out each word of a caption in a wording.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub caption_word_dropout: f64,
    pub ema_decay: f64,
    pub weight_decay: f64,
    pub lr_warmup_steps: usize,
    /// Tokens per prompt, `[CLS]` and `[SEP]` included.
    pub max_text_tokens: usize,
    /// The colour transparent pixels are composited on.
    pub background: [u8; 3],
    /// Side in pixels every image is resized to (a multiple of 8); absent:
    /// the images must already share one size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<usize>,
    /// How a style is named in prompts: `"{caption}, {style} style"`.
    pub style_template: String,
    /// Sampling defaults of the saved model.
    pub guidance_scale: f64,
    pub sample_steps: usize,
    /// Prompts drawn in the per-epoch sample grid.
    pub preview_prompts: Vec<String>,
}

impl Text2ImageConfig {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_validated(path, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        let r = &self.recipe;
        if !(0.0..1.0).contains(&r.cond_dropout) || !(0.0..1.0).contains(&r.style_dropout) {
            return Err(Error::invalid(
                "cond_dropout and style_dropout must be in [0, 1)",
            ));
        }
        if !(0.0..1.0).contains(&r.token_dropout) {
            return Err(Error::invalid("token_dropout must be in [0, 1)"));
        }
        if !(r.sentence_token_noise >= 0.0 && r.sentence_token_noise.is_finite()) {
            return Err(Error::invalid(
                "sentence_token_noise must be a finite number >= 0",
            ));
        }
        if !(0.0..1.0).contains(&r.caption_variant_prob) {
            return Err(Error::invalid("caption_variant_prob must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&r.caption_word_dropout) {
            return Err(Error::invalid("caption_word_dropout must be in [0, 1)"));
        }
        if r.caption_variant_prob > 0.0
            && (r.caption_variants == 0 || r.caption_word_dropout == 0.0)
        {
            return Err(Error::invalid(
                "caption_variant_prob needs caption_variants >= 1 and caption_word_dropout in (0, 1)",
            ));
        }
        if r.caption_variants > 64 {
            return Err(Error::invalid(
                "caption_variants must be at most 64 (every wording is encoded and kept in memory)",
            ));
        }
        if r.sentence_token_noise > 0.0 && !r.sentence_token {
            return Err(Error::invalid("sentence_token_noise needs sentence_token"));
        }
        let cross = cross_attention_width(&self.unet);
        match (
            self.unet.class_embed_type.as_deref(),
            self.unet.projection_class_embeddings_input_dim,
        ) {
            (None, _) if r.token_dropout > 0.0 && !r.sentence_token => return Err(Error::invalid(
                "token_dropout needs the sentence embedding: set sentence_token, or give the UNet \
                     a class embedding (class_embed_type \"projection\")",
            )),
            (None, _) => {}
            (Some("projection"), Some(d)) if d == cross => {}
            _ => {
                return Err(Error::invalid(format!(
                    "the UNet's class embedding is fed the sentence embedding: it must be \
                     class_embed_type \"projection\" with projection_class_embeddings_input_dim = \
                     cross_attention_dim ({cross})"
                )))
            }
        }
        if r.max_text_tokens < 3 || r.max_text_tokens > 512 {
            return Err(Error::invalid("max_text_tokens must be between 3 and 512"));
        }
        check_style_template(&r.style_template)?;
        if r.resolution.is_some_and(|v| v == 0 || v % 8 != 0) {
            return Err(Error::invalid(
                "resolution must be a positive multiple of 8",
            ));
        }
        if self.unet.in_channels != 4 || self.unet.out_channels != 4 {
            return Err(Error::invalid(
                "the UNet must have 4 input and output channels (TAESD latents)",
            ));
        }
        crate::models::config_defaults::check_positive(
            "text2image",
            &[("recipe.sample_steps", r.sample_steps)],
        )?;
        self.training.validate("text2image")
    }
}

impl RunDefaults {
    /// Epochs and batch size must be at least 1.
    pub fn validate(&self, model: &str) -> Result<()> {
        crate::models::config_defaults::check_positive(
            model,
            &[
                ("training.epochs", self.epochs),
                ("training.batch_size", self.batch_size),
            ],
        )
    }
}

/// A recipe's `style_template` must name both the caption and the style.
pub fn check_style_template(template: &str) -> Result<()> {
    if !template.contains("{caption}") || !template.contains("{style}") {
        return Err(Error::invalid(
            "style_template must contain {caption} and {style}",
        ));
    }
    Ok(())
}

/// A style's name as prompts use it: the shard name without its size suffix
/// (`noto-64` -> `noto`).
pub fn style_name(source: &str) -> String {
    let base = source.rsplit('/').next().unwrap_or(source);
    match base.rsplit_once('-') {
        Some((name, size)) if size.chars().all(|c| c.is_ascii_digit()) => name.to_string(),
        _ => base.to_string(),
    }
    .to_lowercase()
}

impl Text2ImageRecipe {
    /// How the training images are loaded.
    pub fn load_options(&self) -> crate::data::LoadOptions {
        crate::data::LoadOptions {
            background: self.background,
            size: self.resolution.map(|r| (r, r)),
            ..crate::data::LoadOptions::default()
        }
    }
}

/// Where the frozen parts come from.
#[derive(Debug, Clone)]
pub struct FrozenParts {
    /// The text encoder's `config.json` and weights: a BERT sentence
    /// encoder (all-MiniLM-L6-v2), or a CLIP (a transformers `CLIPModel`
    /// folder written by `ensueno train clip`, or a `CLIPTextModel` folder).
    pub text_encoder: PathBuf,
    /// The folder with its tokenizer: BERT's `tokenizer.json` (and
    /// `vocab.txt`), or CLIP's `vocab.json` and `merges.txt`.
    pub tokenizer: PathBuf,
    /// `taesd_encoder.safetensors` + `taesd_decoder.safetensors`, or a
    /// diffusers `AutoencoderTiny` folder.
    pub taesd: PathBuf,
}

impl FrozenParts {
    /// The frozen parts as one path names them: a sentence-transformers
    /// folder for the text (its tokenizer beside it), or a diffusers
    /// pipeline folder holding all three (`text_encoder/`, `tokenizer/`,
    /// `vae/`), such as ensueno's shipped model.
    pub fn from_paths(text_encoder: &Path, taesd: Option<&Path>) -> Result<Self> {
        let pipeline = text_encoder.join("model_index.json").is_file();
        let (te, tok) = if pipeline {
            (
                text_encoder.join("text_encoder"),
                text_encoder.join("tokenizer"),
            )
        } else {
            (text_encoder.to_path_buf(), text_encoder.to_path_buf())
        };
        let taesd = match (taesd, pipeline) {
            (Some(t), _) => t.to_path_buf(),
            (None, true) => text_encoder.join("vae"),
            (None, false) => {
                return Err(Error::invalid(
                    "no TAESD given: pass a folder with taesd_encoder.safetensors and \
                     taesd_decoder.safetensors, or a diffusers pipeline folder that has vae/",
                ))
            }
        };
        Ok(Self {
            text_encoder: te,
            tokenizer: tok,
            taesd,
        })
    }
}

/// The two text encoder families a text-to-image model can be trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFamily {
    Bert,
    Clip,
}

impl FrozenParts {
    /// Which family the text encoder is, from its `config.json`'s
    /// `model_type` (`clip` or `clip_text_model`: CLIP; anything else: BERT).
    pub fn text_family(&self) -> Result<TextFamily> {
        let path = self.text_encoder.join("config.json");
        let config: serde_json::Value = crate::io::model_folder::read_json(&path)?;
        Ok(match config.get("model_type").and_then(|v| v.as_str()) {
            Some("clip" | "clip_text_model") => TextFamily::Clip,
            _ => TextFamily::Bert,
        })
    }

    /// The text tower's config: a `CLIPModel`'s `text_config`, or a
    /// `CLIPTextModel`'s whole config.
    fn clip_text_config(&self) -> Result<CLIPTextConfig> {
        let path = self.text_encoder.join("config.json");
        let config: serde_json::Value = crate::io::model_folder::read_json(&path)?;
        let text = match config.get("model_type").and_then(|v| v.as_str()) {
            Some("clip") => config.get("text_config").cloned().unwrap_or_default(),
            _ => config,
        };
        let text: CLIPTextConfig = serde_json::from_value(text).map_err(|e| Error::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        text.validate().map_err(|e| Error::Config {
            path,
            message: e.to_string(),
        })?;
        Ok(text)
    }

    /// The frozen text encoder in f32: BERT with prompts padded to
    /// `max_text_tokens`, or CLIP's text tower with prompts padded to 77
    /// tokens, as Stable Diffusion pads them.
    pub fn load_text_encoder(
        &self,
        max_text_tokens: usize,
        device: &Device,
    ) -> Result<TextEncoder> {
        match self.text_family()? {
            TextFamily::Bert => TextEncoder::bert_from_dir(
                &self.text_encoder,
                &self.tokenizer,
                max_text_tokens,
                device,
                DType::F32,
            ),
            TextFamily::Clip => {
                let config = self.clip_text_config()?;
                let dir = &self.text_encoder;
                let files = crate::io::model_folder::in_component(
                    dir,
                    crate::io::model_folder::component_weight_files(dir),
                )?;
                let vb =
                    crate::io::model_folder::var_builder_from_files(&files, DType::F32, device)?;
                let model =
                    crate::io::model_folder::in_component(dir, CLIPTextModel::new(vb, &config))?;
                let tokenizer = CLIPTokenizer::from_dir(&self.tokenizer)?;
                Ok(TextEncoder::Clip { tokenizer, model })
            }
        }
    }
}

const TAESD_ENCODER: &str = "taesd_encoder.safetensors";
const TAESD_DECODER: &str = "taesd_decoder.safetensors";

impl FrozenParts {
    /// madebyollin's two files, or else a diffusers `AutoencoderTiny` folder.
    fn has_taesd_files(&self) -> bool {
        self.taesd.join(TAESD_ENCODER).is_file() && self.taesd.join(TAESD_DECODER).is_file()
    }

    fn check_vae_dir(&self) -> Result<()> {
        if self.has_taesd_files() || self.taesd.join("config.json").is_file() {
            Ok(())
        } else {
            Err(Error::Model {
                path: self.taesd.clone(),
                message: format!(
                    "not a TAESD folder: expected {TAESD_ENCODER} and {TAESD_DECODER} \
                     (madebyollin/taesd), or a diffusers AutoencoderTiny folder (config.json + weights)"
                ),
            })
        }
    }

    /// The frozen autoencoder, with its encoder, in f32.
    pub fn load_vae(&self, device: &Device) -> Result<AutoencoderTiny> {
        self.check_vae_dir()?;
        if self.has_taesd_files() {
            return AutoencoderTiny::from_taesd_files(
                Some(&self.taesd.join(TAESD_ENCODER)),
                &self.taesd.join(TAESD_DECODER),
                DType::F32,
                device,
            );
        }
        let config = AutoencoderTinyConfig::from_file(&self.taesd.join("config.json"))?;
        let files = crate::io::model_folder::component_weight_files(&self.taesd)?;
        let vb = crate::io::model_folder::var_builder_from_files(&files, DType::F32, device)?;
        crate::io::model_folder::in_component(&self.taesd, AutoencoderTiny::new(vb, &config))
    }

    /// The autoencoder's tensors under diffusers' names, and its config.
    fn vae_tensors(&self) -> Result<(Vec<(String, Tensor)>, AutoencoderTinyConfig)> {
        self.check_vae_dir()?;
        if self.has_taesd_files() {
            let tensors = crate::models::autoencoder_tiny::taesd_diffusers_tensors(
                &self.taesd.join(TAESD_ENCODER),
                &self.taesd.join(TAESD_DECODER),
            )?;
            return Ok((tensors, AutoencoderTinyConfig::default()));
        }
        let config = AutoencoderTinyConfig::from_file(&self.taesd.join("config.json"))?;
        Ok((folder_tensors(&self.taesd)?, config))
    }
}

/// The `scheduler_config.json` of a model trained with `recipe`: the
/// training noise schedule with DPM-Solver++ for sampling (diffusers'
/// `DPMSolverMultistepScheduler`).
pub fn scheduler_config(recipe: &Text2ImageRecipe) -> SchedulerConfig {
    SchedulerConfig {
        class_name: Some("DPMSolverMultistepScheduler".to_string()),
        num_train_timesteps: Some(recipe.num_train_timesteps),
        beta_start: Some(recipe.beta_start),
        beta_end: Some(recipe.beta_end),
        beta_schedule: Some(recipe.beta_schedule.clone()),
        prediction_type: Some("epsilon".to_string()),
        clip_sample: Some(false),
        timestep_spacing: Some("leading".to_string()),
        steps_offset: Some(1),
        ..SchedulerConfig::default()
    }
}

pub struct Text2ImageTask {
    config: Text2ImageConfig,
    frozen: FrozenParts,
    params: ParamStore,
    model: UNet2DConditionModel,
    opt: AdamW,
    ema: Ema,
    base_lr: f64,
    forward: ForwardProcess,
    /// TAESD latents of every training image, [N, 4, h, w].
    latents: Tensor,
    /// Token states of every distinct prompt, [P, T, D].
    text_states: Tensor,
    /// The class labels of every distinct prompt (scaled sentence
    /// embeddings), [P, D], when the UNet has a class embedding.
    sentence: Option<Tensor>,
    /// The sentence token of every distinct prompt, [P, 1, D], when the
    /// recipe asks for it.
    sentence_tokens: Option<Tensor>,
    /// For each image: (styled prompt, plain caption) rows of `text_states`.
    prompt_rows: Vec<(u32, u32)>,
    /// For each image: the same rows for each shorter wording of its
    /// caption (empty when the recipe makes none).
    variant_rows: Vec<Vec<(u32, u32)>>,
    /// The empty prompt's row.
    null_row: u32,
    styles: Vec<String>,
    device: Device,
}

impl Text2ImageTask {
    /// Encodes the whole dataset with the frozen parts and initialises the
    /// UNet (weights seeded by `seed`). `on_progress(done, total, what)`
    /// reports the encoding.
    pub fn new(
        config: Text2ImageConfig,
        frozen: FrozenParts,
        data: &ImageDataset,
        lr: f64,
        seed: u64,
        device: &Device,
        on_progress: &mut dyn FnMut(usize, usize, &str),
    ) -> Result<Self> {
        config.validate()?;
        let recipe = &config.recipe;
        let captions = data.captions.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "{}: text-to-image training needs captions (KEY.txt in the tars, or .txt sidecars)",
                data.name
            ))
        })?;
        if data.channels != 3 || !data.height.is_multiple_of(8) || !data.width.is_multiple_of(8) {
            return Err(Error::invalid(format!(
                "text-to-image training needs RGB images whose sides are multiples of 8, got {}x{}x{}",
                data.channels, data.height, data.width
            )));
        }

        let text_encoder = frozen.load_text_encoder(recipe.max_text_tokens, device)?;
        let cross = text_encoder.hidden_size();
        let unet_cross = cross_attention_width(&config.unet);
        if unet_cross != cross {
            return Err(Error::invalid(format!(
                "the UNet's cross_attention_dim is {unet_cross} but the text encoder's hidden size is {cross}"
            )));
        }

        // Every distinct prompt once: the empty prompt, each caption alone
        // and each caption in its image's style.
        let mut styles: Vec<String> = data.sources.iter().map(|s| style_name(s)).collect();
        styles.sort();
        styles.dedup();
        let mut rows: HashMap<String, u32> = HashMap::new();
        let mut prompts: Vec<String> = Vec::new();
        let mut row_of = |p: String, prompts: &mut Vec<String>| -> u32 {
            *rows.entry(p.clone()).or_insert_with(|| {
                prompts.push(p);
                (prompts.len() - 1) as u32
            })
        };
        let null_row = row_of(String::new(), &mut prompts);
        let mut rows_for = |caption: String, style: &str, prompts: &mut Vec<String>| {
            let styled = if style.is_empty() {
                caption.clone()
            } else {
                styled_prompt(&recipe.style_template, &caption, style)
            };
            (row_of(styled, prompts), row_of(caption, prompts))
        };
        // The wordings of each distinct caption, drawn once from the run's
        // seed, so that both styles of an emoji share them.
        let mut wordings: HashMap<String, Vec<String>> = HashMap::new();
        let mut wording_rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_ca97);
        let mut prompt_rows = Vec::with_capacity(data.len());
        let mut variant_rows = Vec::with_capacity(data.len());
        for (i, caption) in captions.iter().enumerate().take(data.len()) {
            let caption = caption.trim().to_string();
            let style = data
                .sources
                .get(i)
                .map(|s| style_name(s))
                .unwrap_or_default();
            let variants = if recipe.caption_variant_prob > 0.0 {
                wordings
                    .entry(caption.clone())
                    .or_insert_with(|| {
                        caption_variants(
                            &caption,
                            recipe.caption_word_dropout,
                            recipe.caption_variants,
                            &mut wording_rng,
                        )
                    })
                    .clone()
            } else {
                Vec::new()
            };
            prompt_rows.push(rows_for(caption, &style, &mut prompts));
            variant_rows.push(
                variants
                    .into_iter()
                    .map(|v| rows_for(v, &style, &mut prompts))
                    .collect::<Vec<_>>(),
            );
        }

        let chunk = 64;
        let with_sentence = config.unet.class_embed_type.is_some();
        let with_token = recipe.sentence_token;
        let mut states = Vec::with_capacity(prompts.len().div_ceil(chunk));
        let mut sentences = Vec::new();
        let mut tokens = Vec::new();
        for (i, part) in prompts.chunks(chunk).enumerate() {
            let refs: Vec<&str> = part.iter().map(String::as_str).collect();
            if with_sentence || with_token {
                let (hidden, mean, _) = text_encoder.encode_with_mean_state(&refs, 0)?;
                if with_sentence {
                    sentences.push(sentence_class_labels(&mean)?);
                }
                if with_token {
                    tokens.push(mean.unsqueeze(1)?);
                }
                states.push(hidden);
            } else {
                states.push(text_encoder.encode(&refs, 0)?.0);
            }
            on_progress(
                (i * chunk + part.len()).min(prompts.len()),
                prompts.len(),
                "prompts",
            );
        }
        let text_states = Tensor::cat(&states, 0)?;
        let sentence = with_sentence
            .then(|| Tensor::cat(&sentences, 0))
            .transpose()?;
        let sentence_tokens = with_token.then(|| Tensor::cat(&tokens, 0)).transpose()?;
        drop(text_encoder);

        let taesd = frozen.load_vae(device)?;
        let mut latents = Vec::with_capacity(data.len().div_ceil(chunk));
        let all: Vec<usize> = (0..data.len()).collect();
        for (i, idx) in all.chunks(chunk).enumerate() {
            let x = data.batch_images(idx, device)?.affine(2., -1.)?;
            latents.push(taesd.encode(&x)?);
            on_progress(
                (i * chunk + idx.len()).min(data.len()),
                data.len(),
                "images",
            );
        }
        let latents = Tensor::cat(&latents, 0)?;

        let params = ParamStore::new(seed);
        let model =
            UNet2DConditionModel::new(params.var_builder(DType::F32, device), &config.unet)?;
        let opt = params.adamw(ParamsAdamW {
            lr,
            weight_decay: recipe.weight_decay,
            ..ParamsAdamW::default()
        })?;
        let ema = Ema::new(&params, recipe.ema_decay)?;
        let forward = ForwardProcess::new(&scheduler_config(recipe))?;
        Ok(Self {
            config,
            frozen,
            params,
            model,
            opt,
            ema,
            base_lr: lr,
            forward,
            latents,
            text_states,
            sentence,
            sentence_tokens,
            prompt_rows,
            variant_rows,
            null_row,
            styles,
            device: device.clone(),
        })
    }

    pub fn num_parameters(&self) -> usize {
        self.params.num_parameters()
    }

    /// Replaces the random initial UNet weights with those of `dir`: a
    /// diffusers `unet/` folder, or a pipeline folder holding one (as
    /// diffusers' text-to-image fine-tuning starts from a pretrained UNet).
    /// Every weight must be there with the config's shape; the EMA restarts
    /// from the loaded weights. The optimizer state is not in such a folder:
    /// it starts fresh, with the recipe's learning-rate warm-up.
    pub fn init_unet_from(&mut self, dir: &Path) -> Result<()> {
        let unet_dir = if dir.join("model_index.json").is_file() {
            dir.join("unet")
        } else {
            dir.to_path_buf()
        };
        let mut tensors: HashMap<String, Tensor> = folder_tensors(&unet_dir)?.into_iter().collect();
        // A class embedding the loaded UNet lacks starts as a no-op (its last
        // layer zero), so training begins from exactly the loaded model.
        for (name, t) in self.params.tensors() {
            if name.starts_with("class_embedding.") && !tensors.contains_key(&name) {
                // A copy: a variable cannot be set from its own storage.
                let t = if name.starts_with("class_embedding.linear_2.") {
                    t.zeros_like()?
                } else {
                    t.copy()?
                };
                tensors.insert(name, t);
            }
        }
        crate::io::model_folder::in_component(&unet_dir, self.params.load_tensors(&tensors, ""))?;
        self.ema = Ema::new(&self.params, self.config.recipe.ema_decay)?;
        Ok(())
    }

    /// The styles found in the data (`noto`, `twemoji`).
    pub fn styles(&self) -> &[String] {
        &self.styles
    }

    /// Distinct prompts encoded.
    pub fn num_prompts(&self) -> usize {
        self.text_states.dim(0).unwrap_or(0)
    }
}

impl TrainTask for Text2ImageTask {
    fn kind(&self) -> &str {
        "text2image"
    }

    fn loss_names(&self) -> Vec<String> {
        vec!["loss".to_string()]
    }

    fn config(&self) -> serde_json::Value {
        super::model_and_recipe("unet", &self.config.unet, &self.config.recipe)
    }

    fn train_step(&mut self, batch: &Batch, ctx: &StepContext) -> Result<Vec<f64>> {
        let recipe = &self.config.recipe;
        let b = batch.indices.len();
        let idx: Vec<u32> = batch.indices.iter().map(|&i| i as u32).collect();
        let idx_t = Tensor::new(idx.as_slice(), &self.device)?;
        let x0 = self.latents.index_select(&idx_t, 0)?;
        let noise = ctx.rng(0).randn(x0.shape(), DType::F32, &self.device)?;
        let mut rng = ctx.uniform_rng(1);
        let t_count = recipe.num_train_timesteps;
        let ts: Vec<usize> = (0..b).map(|_| rng.random_range(0..t_count)).collect();
        let mut drop = ctx.uniform_rng(2);
        let mut wording = ctx.uniform_rng(5);
        let rows: Vec<u32> = batch
            .indices
            .iter()
            .map(|&i| {
                let variants = &self.variant_rows[i];
                let (styled, plain) = if !variants.is_empty()
                    && wording.random::<f64>() < recipe.caption_variant_prob
                {
                    variants[wording.random_range(0..variants.len())]
                } else {
                    self.prompt_rows[i]
                };
                let u = drop.random::<f64>();
                if u < recipe.cond_dropout {
                    self.null_row
                } else if u < recipe.cond_dropout + recipe.style_dropout {
                    plain
                } else {
                    styled
                }
            })
            .collect();
        let mut token_drop = ctx.uniform_rng(3);
        let token_rows: Vec<u32> = rows
            .iter()
            .map(|&r| {
                if token_drop.random::<f64>() < recipe.token_dropout {
                    self.null_row
                } else {
                    r
                }
            })
            .collect();
        let rows_t = Tensor::new(rows.as_slice(), &self.device)?;
        let mut context = self
            .text_states
            .index_select(&Tensor::new(token_rows.as_slice(), &self.device)?, 0)?;
        if let Some(tokens) = &self.sentence_tokens {
            let mut token = tokens.index_select(&rows_t, 0)?;
            if recipe.sentence_token_noise > 0.0 {
                let noise = ctx.rng(4).randn(token.shape(), DType::F32, &self.device)?;
                token = (token + (noise * recipe.sentence_token_noise)?)?;
            }
            context = Tensor::cat(&[&context, &token], 1)?;
        }
        let class_labels = match &self.sentence {
            Some(s) => Some(s.index_select(&rows_t, 0)?),
            None => None,
        };
        let (xt, t) = self.forward.noise(&x0, &noise, &ts, &self.device)?;
        let pred =
            self.model
                .forward_with_class_labels(&xt, &t, &context, class_labels.as_ref())?;
        let loss = candle_nn::loss::mse(&pred, &noise)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Ok(vec![value]);
        }
        let warm = recipe.lr_warmup_steps;
        let lr = warmup_lr(self.base_lr, ctx.step, warm);
        self.opt.set_learning_rate(lr);
        let grads = loss.backward()?;
        self.opt.step(&grads)?;
        self.ema.update(&self.params)?;
        Ok(vec![value])
    }

    fn end_of_epoch(&mut self, ctx: &EpochContext) -> Result<()> {
        // The runner has just exported `model/`: sample the preview prompts
        // through the same pipeline `ensueno generate` uses.
        let model_dir = ctx.output.join("model");
        if self.config.recipe.preview_prompts.is_empty() || !model_dir.is_dir() {
            return Ok(());
        }
        let folder = crate::io::model_folder::ModelFolder::open(
            &model_dir,
            &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
        )?;
        let pipe =
            crate::pipelines::StableDiffusionPipeline::load(&folder, &self.device, DType::F32)?;
        let mut images = Vec::new();
        for prompt in &self.config.recipe.preview_prompts {
            for k in 0..4 {
                let mut request = crate::pipelines::GenerationRequest::new(prompt.clone());
                request.seed = Some(ctx.seed + k);
                request.steps = self.config.recipe.sample_steps;
                request.guidance_scale = self.config.recipe.guidance_scale;
                let out = pipe.generate(
                    &request,
                    Default::default(),
                    &crate::pipelines::Limits::default(),
                    &mut |_| true,
                )?;
                images.extend(out.images);
            }
        }
        let dir = ctx.output.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("epoch-{:03}.png", ctx.epoch + 1));
        tile(&images, 4)
            .save(&path)
            .map_err(|e| Error::invalid(format!("cannot write {}: {e}", path.display())))
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        save_pipeline_folder(
            dir,
            &self.config,
            &self.frozen,
            self.ema.tensors(),
            &self.styles,
        )
    }

    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.params.state("model.");
        out.extend(self.ema.state("ema.")?);
        out.extend(prefixed("optimizer.", self.opt.state()?));
        Ok(out)
    }

    fn load_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.params.load_tensors(state, "model.")?;
        self.ema.load_state(state, "ema.")?;
        self.opt.load_state(&strip_prefix("optimizer.", state))
    }
}

/// The text width the UNet's cross-attention expects (its first block's).
fn cross_attention_width(unet: &UNet2DConditionConfig) -> usize {
    match &unet.cross_attention_dim {
        crate::models::unet_2d_condition::OneOrMany::One(d) => *d,
        crate::models::unet_2d_condition::OneOrMany::Many(v) => v.first().copied().unwrap_or(0),
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_zero_count(v: &usize) -> bool {
    *v == 0
}

/// Every tensor of a component folder's weight files, on the CPU in their
/// stored dtype, sorted by name (to copy a frozen part as it is).
fn folder_tensors(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for file in crate::io::model_folder::component_weight_files(dir)? {
        tensors.extend(crate::io::weights::load_safetensors(&file, &Device::Cpu)?);
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Images of one size in a grid, `columns` wide.
fn tile(images: &[image::RgbImage], columns: usize) -> image::RgbImage {
    let (w, h) = images.first().map_or((1, 1), |i| i.dimensions());
    let cols = columns.min(images.len()).max(1) as u32;
    let rows = images.len().div_ceil(cols as usize).max(1) as u32;
    let mut out = image::RgbImage::from_pixel(cols * w, rows * h, image::Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i as u32 % cols) * w, (i as u32 / cols) * h);
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    out
}

/// Writes a diffusers `StableDiffusionPipeline` folder: the trained UNet,
/// the frozen BERT and TAESD copied in diffusers' layout, the scheduler and
/// the tokenizer (padded to `max_text_tokens`).
pub fn save_pipeline_folder(
    dir: &Path,
    config: &Text2ImageConfig,
    frozen: &FrozenParts,
    unet: &[(String, Tensor)],
    styles: &[String],
) -> Result<()> {
    let recipe = &config.recipe;
    let (text_class, tokenizer_class) = match frozen.text_family()? {
        TextFamily::Bert => ("BertModel", "BertTokenizerFast"),
        TextFamily::Clip => ("CLIPTextModel", "CLIPTokenizer"),
    };
    write_json(
        &dir.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", text_class],
            "tokenizer": ["transformers", tokenizer_class],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderTiny"],
        }),
    )?;
    let sub = |name: &str| -> Result<PathBuf> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        Ok(d)
    };

    let unet_dir = sub("unet")?;
    write_json(
        &unet_dir.join("config.json"),
        &with_diffusers_class(super::to_json(&config.unet)?, "UNet2DConditionModel"),
    )?;
    crate::io::weights::save_safetensors(
        &unet_dir.join("diffusion_pytorch_model.safetensors"),
        unet,
        None,
    )?;

    let sched = sub("scheduler")?;
    let mut sched_json = with_diffusers_class(
        super::to_json(&scheduler_config(recipe))?,
        "DPMSolverMultistepScheduler",
    );
    if let Some(map) = sched_json.as_object_mut() {
        map.insert("algorithm_type".into(), "dpmsolver++".into());
        map.insert("solver_order".into(), 2.into());
    }
    write_json(&sched.join("scheduler_config.json"), &sched_json)?;

    // The VAE under diffusers' AutoencoderTiny names.
    let vae = sub("vae")?;
    let (tensors, vae_config) = frozen.vae_tensors()?;
    crate::io::weights::save_safetensors(
        &vae.join("diffusion_pytorch_model.safetensors"),
        &tensors,
        None,
    )?;
    write_json(
        &vae.join("config.json"),
        &with_diffusers_class(super::to_json(&vae_config)?, "AutoencoderTiny"),
    )?;

    match frozen.text_family()? {
        TextFamily::Bert => save_bert_text_encoder(dir, recipe, frozen)?,
        TextFamily::Clip => save_clip_text_encoder(dir, frozen)?,
    }

    write_json(
        &dir.join(PROMPTING_JSON),
        &super::to_json(&PromptingConfig {
            styles: styles.to_vec(),
            style_template: recipe.style_template.clone(),
            guidance_scale: recipe.guidance_scale,
            num_inference_steps: recipe.sample_steps,
            sentence_token: recipe.sentence_token,
        })?,
    )
}

/// A pipeline's `text_encoder/` and `tokenizer/` from a BERT sentence
/// encoder: its config with the mask flag diffusers reads, its weights as
/// they are, and its tokenizer padded to `max_text_tokens`.
fn save_bert_text_encoder(
    dir: &Path,
    recipe: &Text2ImageRecipe,
    frozen: &FrozenParts,
) -> Result<()> {
    let sub = |name: &str| -> Result<PathBuf> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        Ok(d)
    };
    // The text encoder: BERT's config with the mask flag diffusers reads,
    // and its weights as they are.
    let te = sub("text_encoder")?;
    let src_config = frozen.text_encoder.join("config.json");
    let mut te_config: serde_json::Value = crate::io::model_folder::read_json(&src_config)?;
    if let Some(map) = te_config.as_object_mut() {
        map.insert("use_attention_mask".into(), true.into());
        map.insert("architectures".into(), serde_json::json!(["BertModel"]));
    }
    write_json(&te.join("config.json"), &te_config)?;
    let tensors = folder_tensors(&frozen.text_encoder)?;
    crate::io::weights::save_safetensors(&te.join("model.safetensors"), &tensors, None)?;

    // The tokenizer: padding and truncation live in tokenizer_config.json
    // (transformers ignores the ones stored in tokenizer.json).
    let tok = sub("tokenizer")?;
    let mut tok_json: serde_json::Value =
        crate::io::model_folder::read_json(&frozen.tokenizer.join("tokenizer.json"))?;
    if let Some(map) = tok_json.as_object_mut() {
        map.insert("padding".into(), serde_json::Value::Null);
        map.insert("truncation".into(), serde_json::Value::Null);
    }
    // Compact, as the tokenizers library writes it.
    let tok_path = tok.join("tokenizer.json");
    let bytes = serde_json::to_vec(&tok_json).map_err(|e| Error::invalid(e.to_string()))?;
    crate::io::atomic::write_atomic(&tok_path, |w| {
        std::io::Write::write_all(w, &bytes).map_err(|e| Error::io(&tok_path, e))
    })?;
    for name in ["vocab.txt", "special_tokens_map.json"] {
        let src = frozen.tokenizer.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            let dst = tok.join(name);
            crate::io::atomic::write_atomic(&dst, |w| {
                std::io::Write::write_all(w, &bytes).map_err(|e| Error::io(&dst, e))
            })?;
        }
    }
    write_json(
        &tok.join("tokenizer_config.json"),
        &serde_json::json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": true,
            "model_max_length": recipe.max_text_tokens,
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "tokenize_chinese_chars": true,
            "strip_accents": null,
            "clean_up_tokenization_spaces": true,
        }),
    )?;

    Ok(())
}

/// A pipeline's `text_encoder/` and `tokenizer/` from a CLIP: the text
/// tower alone as a transformers `CLIPTextModel` (weights at the root, as
/// transformers 5 writes them) and the CLIP BPE tokenizer, padded to 77
/// tokens as Stable Diffusion's is.
fn save_clip_text_encoder(dir: &Path, frozen: &FrozenParts) -> Result<()> {
    let te = dir.join("text_encoder");
    std::fs::create_dir_all(&te).map_err(|e| Error::io(&te, e))?;
    let mut te_config = super::to_json(&frozen.clip_text_config()?)?;
    if let Some(map) = te_config.as_object_mut() {
        map.insert("architectures".into(), serde_json::json!(["CLIPTextModel"]));
        map.insert("model_type".into(), serde_json::json!("clip_text_model"));
    }
    write_json(&te.join("config.json"), &te_config)?;
    let tensors: Vec<(String, Tensor)> = folder_tensors(&frozen.text_encoder)?
        .into_iter()
        .filter_map(|(k, t)| {
            let root = k.strip_prefix("text_model.").map(str::to_string);
            match root {
                Some(r) => Some((r, t)),
                // A CLIPTextModel folder already at the root.
                None if !k.starts_with("vision_model.")
                    && !k.contains("projection")
                    && k != "logit_scale" =>
                {
                    Some((k, t))
                }
                None => None,
            }
        })
        .collect();
    crate::io::weights::save_safetensors(&te.join("model.safetensors"), &tensors, None)?;

    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).map_err(|e| Error::io(&tok, e))?;
    for name in ["vocab.json", "merges.txt"] {
        let src = frozen.tokenizer.join(name);
        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
        let dst = tok.join(name);
        crate::io::atomic::write_atomic(&dst, |w| {
            std::io::Write::write_all(w, &bytes).map_err(|e| Error::io(&dst, e))
        })?;
    }
    let special = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    });
    write_json(&tok.join("special_tokens_map.json"), &special)?;
    let mut config = special;
    if let Some(map) = config.as_object_mut() {
        map.insert("tokenizer_class".into(), "CLIPTokenizer".into());
        map.insert(
            "model_max_length".into(),
            crate::pipelines::text_encoder::CLIP_MAX_TOKENS.into(),
        );
        map.insert("do_lower_case".into(), true.into());
    }
    write_json(&tok.join("tokenizer_config.json"), &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn style_names_and_prompts() {
        assert_eq!(style_name("noto-64"), "noto");
        assert_eq!(style_name("Twemoji-64"), "twemoji");
        assert_eq!(style_name("sketches"), "sketches");
        assert_eq!(
            styled_prompt("{caption}, {style} style", "elephant", "noto"),
            "elephant, noto style"
        );
    }
}

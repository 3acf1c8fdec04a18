//! The text-to-image trainer end to end on tiny parts: a 2-layer BERT
//! (fixtures/bert/tiny), a tiny AutoencoderTiny (fixtures/pipeline/
//! tiny-bert-taesd/vae) and six 16x16 captioned emoji. Checks that it
//! trains, that the exported folder is a Stable Diffusion pipeline our
//! loader generates from (with the style convention it was trained with),
//! that a resumed run replays the uninterrupted one exactly, and that bad
//! inputs are refused with clear errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ensueno::data;
use ensueno::io::model_folder::ModelFolder;
use ensueno::pipelines::prompting::PromptingConfig;
use ensueno::pipelines::{GenerationRequest, Limits, StableDiffusionPipeline};
use ensueno::train::text2image::{FrozenParts, Text2ImageConfig, Text2ImageTask};
use ensueno::train::{train, TrainOptions, TrainTask};

/// Single-threaded runs repeat to the last bit (see train_vae_gan.rs).
fn single_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("RAYON_NUM_THREADS", "1"));
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn frozen() -> FrozenParts {
    FrozenParts {
        text_encoder: fixtures().join("bert/tiny"),
        tokenizer: fixtures().join("bert/tiny"),
        taesd: fixtures().join("pipeline/tiny-bert-taesd/vae"),
    }
}

fn tiny_config() -> Text2ImageConfig {
    serde_json::from_value(serde_json::json!({
        "unet": {
            "sample_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [16, 32],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 32,
            "attention_head_dim": 2
        },
        "recipe": {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "cond_dropout": 0.1,
            "style_dropout": 0.3,
            "ema_decay": 0.9,
            "weight_decay": 0.0,
            "lr_warmup_steps": 2,
            "max_text_tokens": 16,
            "background": [255, 255, 255],
            "resolution": 16,
            "style_template": "{caption}, {style} style",
            "guidance_scale": 3.0,
            "sample_steps": 4,
            "preview_prompts": ["elephant"]
        },
        "training": {"epochs": 2, "batch_size": 4, "lr": 0.001, "seed": 0}
    }))
    .unwrap()
}

fn emoji6() -> ensueno::data::ImageDataset {
    let options = tiny_config().recipe.load_options();
    data::open(&fixtures().join("data/emoji6.tar"), &options).unwrap()
}

/// max |t| in f32.
fn max_abs(t: &candle_core::Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The model `run` exports after one epoch into `dir/run`.
fn trained_one_epoch(dir: &Path) -> PathBuf {
    let out = dir.join("run");
    run(&out, 1, false);
    out.join("model")
}

/// Loads an exported pipeline folder and generates one image (seed 1).
fn generate(
    model: &Path,
    prompt: &str,
    steps: usize,
) -> (StableDiffusionPipeline, Vec<image::RgbImage>) {
    let folder = ModelFolder::open(
        model,
        &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    )
    .unwrap();
    let pipe = StableDiffusionPipeline::load(&folder, &Device::Cpu, DType::F32).unwrap();
    let mut request = GenerationRequest::new(prompt.to_string());
    request.steps = steps;
    request.seed = Some(1);
    let out = pipe
        .generate(
            &request,
            Default::default(),
            &Limits::default(),
            &mut |_| true,
        )
        .unwrap();
    (pipe, out.images)
}

/// A task on the tiny parts, its UNet initialised with `seed`.
fn new_task(
    config: Text2ImageConfig,
    data: &ensueno::data::ImageDataset,
    seed: u64,
) -> Text2ImageTask {
    Text2ImageTask::new(
        config,
        frozen(),
        data,
        1e-3,
        seed,
        &Device::Cpu,
        &mut |_, _, _| {},
    )
    .unwrap()
}

/// Trains `task` for `epochs` into `output`; the per-epoch losses.
fn train_task(
    task: &mut Text2ImageTask,
    data: &ensueno::data::ImageDataset,
    output: &Path,
    epochs: usize,
    resume: bool,
) -> Vec<Vec<f64>> {
    let options = TrainOptions {
        epochs,
        batch_size: 4,
        lr: 1e-3,
        seed: 0,
        resume,
        ..TrainOptions::new(output)
    };
    train(task, data, &options, &Device::Cpu, &mut |_| {})
        .unwrap()
        .epoch_losses
}

fn run(output: &Path, epochs: usize, resume: bool) -> Vec<Vec<f64>> {
    let data = emoji6();
    let mut task = new_task(tiny_config(), &data, 0);
    train_task(&mut task, &data, output, epochs, resume)
}

#[test]
fn trains_exports_a_pipeline_and_resumes_exactly() {
    single_thread();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let losses = run(&full, 2, false);
    assert_eq!(losses.len(), 2);
    assert!(losses.iter().flatten().all(|l| l.is_finite() && *l > 0.0));

    // The export is a diffusers StableDiffusionPipeline folder.
    let model = full.join("model");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    assert_eq!(index["text_encoder"][1], "BertModel");
    assert_eq!(index["vae"][1], "AutoencoderTiny");
    let te: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(te["use_attention_mask"], true);
    assert!(full.join("samples/epoch-002.png").is_file());

    // The style names come from the tar's name; the pipeline generates at
    // the training size from a styled prompt.
    let prompting = PromptingConfig::load(&model).unwrap().unwrap();
    assert_eq!(prompting.styles, vec!["emoji6".to_string()]);
    let prompt = prompting.apply_style("elephant", "emoji6").unwrap();
    let (pipe, images) = generate(&model, &prompt, 3);
    assert_eq!(pipe.default_size(), (16, 16));
    assert_eq!(images[0].dimensions(), (16, 16));

    // One epoch, then resume to two: the same losses, bit for bit.
    let resumed = dir.path().join("resumed");
    run(&resumed, 1, false);
    let again = run(&resumed, 2, true);
    assert_eq!(again, losses);
}

#[test]
fn bad_inputs_are_refused_clearly() {
    single_thread();
    let refusal = |config: Text2ImageConfig, frozen: FrozenParts, data: &data::ImageDataset| {
        Text2ImageTask::new(
            config,
            frozen,
            data,
            1e-3,
            0,
            &Device::Cpu,
            &mut |_, _, _| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let data = emoji6();

    // A tar without captions is refused when it is opened.
    let e = data::open(
        &fixtures().join("data/no_captions.tar"),
        &tiny_config().recipe.load_options(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("captions"), "{e}");

    let mut config = tiny_config();
    config.unet.cross_attention_dim = ensueno::models::unet_2d_condition::OneOrMany::One(64);
    let e = refusal(config, frozen(), &data);
    assert!(
        e.contains("cross_attention_dim is 64") && e.contains("32"),
        "{e}"
    );

    let e = refusal(
        tiny_config(),
        FrozenParts {
            taesd: fixtures().join("data"),
            ..frozen()
        },
        &data,
    );
    assert!(e.contains("not a TAESD folder"), "{e}");

    let mut config = tiny_config();
    config.recipe.style_template = "{caption}".into();
    let e = refusal(config, frozen(), &data);
    assert!(e.contains("style_template"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"unet": {}, "recipe": {}}"#).unwrap();
    let e = Text2ImageConfig::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
}

/// The frozen parts can come from an existing pipeline folder (as they do,
/// by default, from the shipped model): its text_encoder/, tokenizer/, vae/.
#[test]
fn frozen_parts_from_a_pipeline_folder() {
    single_thread();
    let root = fixtures().join("pipeline/tiny-bert-taesd");
    let frozen = FrozenParts::from_paths(&root, None).unwrap();
    assert_eq!(frozen.taesd, root.join("vae"));
    let data = emoji6();
    let mut task = Text2ImageTask::new(
        tiny_config(),
        frozen,
        &data,
        1e-3,
        0,
        &Device::Cpu,
        &mut |_, _, _| {},
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = TrainOptions {
        epochs: 1,
        batch_size: 4,
        ..TrainOptions::new(dir.path())
    };
    let summary = train(&mut task, &data, &options, &Device::Cpu, &mut |_| {}).unwrap();
    assert!(summary.epoch_losses[0][0].is_finite());
    let e = FrozenParts::from_paths(&fixtures().join("bert/tiny"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no TAESD given"), "{e}");
}

#[test]
fn init_unet_starts_from_an_exported_unet_and_refuses_a_mismatched_one() {
    single_thread();
    let dir = tempfile::tempdir().unwrap();
    let model = trained_one_epoch(dir.path());
    let unet_of = |folder: &Path| {
        candle_core::safetensors::load(
            folder.join("unet/diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    };
    // What `task` exports (its EMA weights), through a fresh folder.
    let export = |task: &Text2ImageTask, name: &str| {
        let folder = dir.path().join(name);
        std::fs::create_dir_all(&folder).unwrap();
        task.save_model(&folder).unwrap();
        unet_of(&folder)
    };
    let exported = unet_of(&model);

    let data = emoji6();
    // A differently seeded task starts elsewhere, then from the export (the
    // pipeline folder or its unet/), and its EMA (what it exports) with it.
    let mut task = new_task(tiny_config(), &data, 7);
    let before = export(&task, "fresh");
    let key = "down_blocks.0.resnets.0.conv1.weight";
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
    };
    assert!(diff(&before[key], &exported[key]) > 1e-3);
    for source in [model.clone(), model.join("unet")] {
        task.init_unet_from(&source).unwrap();
        let after = export(&task, "again");
        assert_eq!(after.len(), exported.len());
        for (name, t) in &exported {
            assert!(diff(&after[name], t) < 1e-6, "{name}");
        }
    }

    // Another architecture: a clear error naming the tensor, nothing panics.
    let mut config = tiny_config();
    config.unet.block_out_channels = vec![8, 16];
    let mut other = new_task(config, &data, 0);
    let e = other.init_unet_from(&model).unwrap_err().to_string();
    assert!(e.contains("shape") || e.contains("expected"), "{e}");
    let e = other
        .init_unet_from(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(!e.is_empty());
}

/// `tiny_config` with a class embedding fed the sentence embedding.
fn sentence_config() -> Text2ImageConfig {
    let mut config = tiny_config();
    config.unet.class_embed_type = Some("projection".into());
    config.unet.projection_class_embeddings_input_dim = Some(32);
    config.recipe.token_dropout = 0.5;
    config
}

#[test]
fn sentence_embedding_conditioning_starts_as_the_loaded_model_trains_and_generates() {
    single_thread();
    let dir = tempfile::tempdir().unwrap();
    let plain = trained_one_epoch(dir.path());
    let data = emoji6();
    let mut task = new_task(sentence_config(), &data, 3);
    // The loaded UNet lacks class_embedding.*: it is added as a no-op, so
    // the new model predicts what the loaded one does, whatever the labels.
    task.init_unet_from(&plain).unwrap();
    let start = dir.path().join("start");
    std::fs::create_dir_all(&start).unwrap();
    task.save_model(&start).unwrap();
    let load = |folder: &Path| {
        let folder =
            ModelFolder::open(folder, &["text_encoder", "tokenizer", "unet", "vae"]).unwrap();
        let config = ensueno::models::unet_2d_condition::UNet2DConditionConfig::from_file(
            folder.config_path("unet").unwrap(),
        )
        .unwrap();
        let vb = folder
            .var_builder("unet", DType::F32, &Device::Cpu)
            .unwrap();
        ensueno::models::unet_2d_condition::UNet2DConditionModel::new(vb, &config).unwrap()
    };
    let (old, new) = (load(&plain), load(&start));
    assert_eq!(new.class_labels_dim(), Some(32));
    let x = candle_core::Tensor::randn(0f32, 1., (2, 4, 2, 2), &Device::Cpu).unwrap();
    let t = candle_core::Tensor::new(&[10f32, 600.], &Device::Cpu).unwrap();
    let enc = candle_core::Tensor::randn(0f32, 1., (2, 16, 32), &Device::Cpu).unwrap();
    let labels = candle_core::Tensor::randn(0f32, 1., (2, 32), &Device::Cpu).unwrap();
    let a = old.forward(&x, &t, &enc).unwrap();
    let b = new
        .forward_with_class_labels(&x, &t, &enc, Some(&labels))
        .unwrap();
    assert!(max_abs(&(a - b).unwrap()) < 1e-6);

    // Training moves the class embedding, and the exported pipeline feeds it
    // the prompt's sentence embedding.
    let out = dir.path().join("sentence");
    let losses = train_task(&mut task, &data, &out, 1, false);
    assert!(losses[0][0].is_finite());
    let weights = candle_core::safetensors::load(
        out.join("model/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let l2 = max_abs(&weights["class_embedding.linear_2.weight"]);
    assert!(l2 > 0.0, "the class embedding did not train");
    let (_, images) = generate(&out.join("model"), "a pachyderm", 2);
    assert_eq!(images.len(), 1);
}

#[test]
fn sentence_embedding_settings_are_checked() {
    let mut config = tiny_config();
    config.recipe.token_dropout = 0.2;
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("token_dropout"), "{e}");
    let mut config = sentence_config();
    config.unet.projection_class_embeddings_input_dim = Some(16);
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("projection_class_embeddings_input_dim"), "{e}");
    let mut config = sentence_config();
    config.recipe.token_dropout = 1.0;
    assert!(config.validate().is_err());
    assert!(sentence_config().validate().is_ok());
    // The sentence token is the other way to feed the sentence embedding.
    let mut config = tiny_config();
    config.recipe.token_dropout = 0.2;
    config.recipe.sentence_token = true;
    assert!(config.validate().is_ok());
    config.recipe.sentence_token_noise = 0.1;
    assert!(config.validate().is_ok());
    config.recipe.sentence_token_noise = f64::NAN;
    assert!(config.validate().is_err());
    config.recipe.sentence_token_noise = 0.1;
    config.recipe.sentence_token = false;
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("sentence_token_noise"), "{e}");
}

#[test]
fn sentence_token_is_the_mean_token_state_in_training_and_generation() {
    single_thread();
    let dir = tempfile::tempdir().unwrap();
    let data = emoji6();
    let mut config = tiny_config();
    config.recipe.sentence_token = true;
    config.recipe.token_dropout = 0.5;
    config.validate().unwrap();
    let mut task = new_task(config, &data, 0);
    let out = dir.path().join("token");
    let losses = train_task(&mut task, &data, &out, 1, false);
    assert!(losses[0][0].is_finite());
    let model = out.join("model");
    let prompting = PromptingConfig::load(&model).unwrap().unwrap();
    assert!(prompting.sentence_token);

    // Noise on the sentence token changes what the UNet sees in training,
    // and only that: the same seeds give other losses.
    let mut noisy = tiny_config();
    noisy.recipe.sentence_token = true;
    noisy.recipe.token_dropout = 0.5;
    noisy.recipe.sentence_token_noise = 0.5;
    let mut task = new_task(noisy, &data, 0);
    let noisy_losses = train_task(&mut task, &data, &dir.path().join("noisy"), 1, false);
    assert!(noisy_losses[0][0].is_finite());
    assert_ne!(noisy_losses[0][0], losses[0][0]);

    // The pipeline appends the mean of the real tokens' states.
    let (pipe, images) = generate(&model, "a pachyderm", 2);
    assert_eq!(images.len(), 1);
    let (hidden, _) = pipe.encode_prompt("a pachyderm", 0).unwrap();
    assert_eq!(hidden.dims(), &[1, 17, 32]);
    let tokenizer =
        tokenizers::Tokenizer::from_file(fixtures().join("bert/tiny/tokenizer.json")).unwrap();
    let n: u32 = tokenizer
        .encode("a pachyderm", true)
        .unwrap()
        .get_attention_mask()
        .iter()
        .sum();
    assert!(n > 2 && n < 16, "{n} real tokens");
    let mean = hidden
        .narrow(1, 0, n as usize)
        .unwrap()
        .mean(1)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let last = hidden.narrow(1, 16, 1).unwrap().squeeze(1).unwrap();
    let last = last.squeeze(0).unwrap();
    assert!(max_abs(&(&last - &mean).unwrap()) < 1e-5);
    // Not just any token state: padding changes the mean over all 16.
    let all = hidden.narrow(1, 0, 16).unwrap().mean(1).unwrap();
    let all = all.squeeze(0).unwrap();
    assert!(max_abs(&(&last - &all).unwrap()) > 1e-3);

    // A model saved without the flag conditions on the token states alone.
    let plain = trained_one_epoch(dir.path());
    let (pipe, _) = generate(&plain, "a pachyderm", 2);
    assert_eq!(
        pipe.encode_prompt("a pachyderm", 0).unwrap().0.dims(),
        &[1, 16, 32]
    );
}

#[test]
fn caption_word_dropout_trains_on_shorter_wordings() {
    single_thread();
    let dir = tempfile::tempdir().unwrap();
    let data = emoji6();
    let plain = new_task(tiny_config(), &data, 0);
    let mut config = tiny_config();
    config.recipe.caption_variant_prob = 0.5;
    config.recipe.caption_variants = 2;
    config.recipe.caption_word_dropout = 0.5;
    config.validate().unwrap();
    let mut task = new_task(config.clone(), &data, 0);
    // The wordings are encoded once, beside the captions: at least one
    // more prompt for each multi-word caption, at most two per caption in
    // each of its forms (with and without the style).
    let captions = data.captions.as_ref().unwrap();
    let multi_word = captions
        .iter()
        .filter(|c| c.split_whitespace().count() > 1)
        .count();
    assert!(multi_word > 0);
    assert!(task.num_prompts() >= plain.num_prompts() + multi_word);
    assert!(task.num_prompts() <= plain.num_prompts() + 2 * 3 * captions.len());
    let losses = train_task(&mut task, &data, &dir.path().join("words"), 1, false);
    let mut plain = plain;
    let plain_losses = train_task(&mut plain, &data, &dir.path().join("plain"), 1, false);
    assert!(losses[0][0].is_finite());
    assert_ne!(losses[0][0], plain_losses[0][0]);
    // The same seed draws the same wordings and steps again.
    let mut again = new_task(config, &data, 0);
    let again_losses = train_task(&mut again, &data, &dir.path().join("again"), 1, false);
    assert_eq!(again_losses, losses);
}

#[test]
fn caption_word_dropout_settings_are_checked() {
    let mut config = tiny_config();
    config.recipe.caption_variant_prob = 0.3;
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("caption_variants"), "{e}");
    config.recipe.caption_variants = 3;
    assert!(config.validate().is_err(), "no word dropout");
    config.recipe.caption_word_dropout = 1.0;
    assert!(config.validate().is_err());
    config.recipe.caption_word_dropout = f64::NAN;
    assert!(config.validate().is_err());
    config.recipe.caption_word_dropout = 0.4;
    assert!(config.validate().is_ok());
    config.recipe.caption_variant_prob = 1.0;
    assert!(config.validate().is_err());
    config.recipe.caption_variant_prob = f64::NAN;
    assert!(config.validate().is_err());
    config.recipe.caption_variant_prob = 0.3;
    config.recipe.caption_variants = 1000;
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("at most 64"), "{e}");
}

/// The tiny transformers `CLIPModel` of `scripts/golden/clip_model.py`
/// (text tower 32 wide, end of text 999) with the tiny CLIP tokenizer: the
/// kind of folder `ensueno train clip` writes.
fn clip_frozen() -> FrozenParts {
    FrozenParts {
        text_encoder: fixtures().join("clip_model"),
        tokenizer: fixtures().join("tiny_clip_tokenizer"),
        taesd: fixtures().join("pipeline/tiny-bert-taesd/vae"),
    }
}

#[test]
fn trains_on_a_clip_text_encoder_and_exports_a_clip_pipeline() {
    single_thread();
    use ensueno::train::text2image::TextFamily;
    let frozen = clip_frozen();
    assert_eq!(frozen.text_family().unwrap(), TextFamily::Clip);
    assert_eq!(self::frozen().text_family().unwrap(), TextFamily::Bert);

    let data = emoji6();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut task = Text2ImageTask::new(
        tiny_config(),
        frozen.clone(),
        &data,
        1e-3,
        0,
        &Device::Cpu,
        &mut |_, _, _| {},
    )
    .unwrap();
    let losses = train_task(&mut task, &data, &out, 1, false);
    assert!(losses[0][0].is_finite() && losses[0][0] > 0.0);

    // The export is a Stable Diffusion pipeline with a CLIP text encoder and
    // tokenizer, as Stable Diffusion 1.x has.
    let model = out.join("model");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["text_encoder"][1], "CLIPTextModel");
    assert_eq!(index["tokenizer"][1], "CLIPTokenizer");
    let te: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(te["hidden_size"], 32);
    assert_eq!(te["eos_token_id"], 999);
    let (pipe, images) = generate(&model, "elephant, emoji6 style", 3);
    assert_eq!(images[0].dimensions(), (16, 16));

    // Its text encoder is the CLIP's text tower: the same hidden states.
    let folder = ModelFolder::open(&model, &["text_encoder", "tokenizer"]).unwrap();
    let exported =
        ensueno::pipelines::text_encoder::TextEncoder::load(&folder, &Device::Cpu, DType::F32)
            .unwrap();
    let original = frozen.load_text_encoder(16, &Device::Cpu).unwrap();
    let (a, _) = exported.encode(&["a red apple"], 0).unwrap();
    let (b, _) = original.encode(&["a red apple"], 0).unwrap();
    assert_eq!(a.dims(), &[1, 77, 32]);
    assert_eq!(max_abs(&(a - b).unwrap()), 0.0);
    drop(pipe);

    // The sentence token is BERT's mean token state: refused with CLIP.
    let err = Text2ImageTask::new(
        sentence_config(),
        clip_frozen(),
        &data,
        1e-3,
        0,
        &Device::Cpu,
        &mut |_, _, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("need a BERT text encoder"), "{err}");
}

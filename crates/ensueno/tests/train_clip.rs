//! `ensueno train clip` end to end on tiny parts: a 2-layer CLIP over six
//! 16x16 captioned emoji (fixtures/data/emoji6.tar) with the tiny CLIP BPE
//! tokenizer (fixtures/tiny_clip_tokenizer). Checks that it learns (the loss
//! falls and the captions find their images), that the saved folder is a
//! transformers `CLIPModel` folder that loads back to the same embeddings,
//! that a resumed run replays the uninterrupted one exactly, and that bad
//! inputs are refused with clear errors.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ensueno::data;
use ensueno::eval::zero_shot::{Direction, ZeroShotScore};
use ensueno::train::clip::{ClipTask, ClipTrainConfig, LoadedClip};
use ensueno::train::{train, TrainOptions};

/// Single-threaded runs repeat to the last bit (see train_vae_gan.rs).
fn single_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("RAYON_NUM_THREADS", "1"));
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tokenizer_dir() -> PathBuf {
    fixtures().join("tiny_clip_tokenizer")
}

fn tiny_config() -> ClipTrainConfig {
    serde_json::from_value(serde_json::json!({
        "model": {
            "text_config": {
                "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                "projection_dim": 16, "bos_token_id": 998, "eos_token_id": 999,
                "pad_token_id": 999
            },
            "vision_config": {
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "image_size": 16, "patch_size": 4,
                "hidden_act": "quick_gelu", "projection_dim": 16
            },
            "projection_dim": 16,
            "logit_scale_init_value": 2.6592
        },
        "recipe": {
            "style_prob": 0.5,
            "style_template": "{caption}, {style} style",
            "max_text_tokens": 16,
            "weight_decay": 0.0,
            "lr_warmup_steps": 2,
            "background": [255, 255, 255],
            "eval_every": 0
        },
        "training": {"epochs": 2, "batch_size": 3, "lr": 0.003, "seed": 0}
    }))
    .unwrap()
}

fn emoji6(config: &ClipTrainConfig) -> ensueno::data::ImageDataset {
    let options = config
        .recipe
        .load_options(config.model.vision_config.image_size);
    data::open(&fixtures().join("data/emoji6.tar"), &options).unwrap()
}

/// Trains the tiny CLIP for `epochs` into `output`; the task and the
/// per-epoch losses.
fn run(output: &Path, epochs: usize, resume: bool) -> (ClipTask, Vec<Vec<f64>>) {
    let config = tiny_config();
    let data = emoji6(&config);
    let mut task = ClipTask::new(config, &tokenizer_dir(), &data, 3e-3, 0, &Device::Cpu).unwrap();
    let options = TrainOptions {
        epochs,
        batch_size: 3,
        lr: 3e-3,
        seed: 0,
        resume,
        ..TrainOptions::new(output)
    };
    let losses = train(&mut task, &data, &options, &Device::Cpu, &mut |_| {})
        .unwrap()
        .epoch_losses;
    (task, losses)
}

fn caption_to_image(scores: &[ZeroShotScore]) -> &ZeroShotScore {
    scores
        .iter()
        .find(|s| s.direction == Direction::TextToImage)
        .expect("a caption -> image score")
}

#[test]
fn learns_saves_a_transformers_folder_and_resumes_exactly() {
    single_thread();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let (task, losses) = run(&full, 40, false);
    assert_eq!(losses.len(), 40);
    assert!(losses.iter().flatten().all(|l| l.is_finite()));
    // Chance for 3 pairs is ln 3 = 1.10 per direction; it has to learn the six pairs.
    let (first, last) = (losses[0][0], losses[39][0]);
    assert!(
        last < 0.5 * first,
        "the loss fell from {first} to only {last}"
    );
    let scores = task.last_scores();
    let c2i = caption_to_image(scores);
    assert_eq!((c2i.n, c2i.gallery), (6, 6));
    assert!(c2i.top1 >= 4.0 / 6.0, "captions find their images: {c2i:?}");
    assert!(full.join("zero_shot/epoch-040.json").is_file());

    // The export is a transformers CLIPModel folder with its tokenizer and
    // image processor; it loads back to the trained embeddings.
    let model = full.join("model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "CLIPModel");
    assert_eq!(config["text_config"]["model_type"], "clip_text_model");
    assert_eq!(config["vision_config"]["image_size"], 16);
    for f in [
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        assert!(model.join(f).is_file(), "{f}");
    }
    let loaded = LoadedClip::load(&model, &Device::Cpu).unwrap();
    let config = tiny_config();
    let data = emoji6(&config);
    let eval = ensueno::eval::zero_shot::ClipZeroShot {
        model: &loaded.model,
        tokenizer: &loaded.tokenizer,
        max_tokens: loaded.recipe.as_ref().unwrap().max_text_tokens,
        norm: ensueno::train::clip::OPENAI_CLIP_NORMALIZATION,
    };
    let cases: Vec<_> = (0..data.len())
        .map(|i| ensueno::eval::retrieval::RetrievalCase {
            index: i,
            key: data.keys[i].clone(),
            text: data.captions.as_ref().unwrap()[i].trim().to_string(),
            style: "emoji6".to_string(),
            kind: ensueno::eval::retrieval::CaseKind::Caption,
        })
        .collect();
    // The reloaded weights and recipe give the same scores.
    let again = eval
        .evaluate(
            &data,
            &cases,
            &|s| ensueno::train::text2image::style_name(s),
            &|c| format!("{}, {} style", c.text, c.style),
        )
        .unwrap();
    assert_eq!(caption_to_image(&again), c2i);

    // Resumed after 20 epochs, the run replays the uninterrupted one.
    let part = dir.path().join("part");
    run(&part, 20, false);
    let (_, resumed) = run(&part, 40, true);
    assert_eq!(resumed, losses, "resumed run differs");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let config = tiny_config();
    let data = emoji6(&config);

    // The tokenizer's end of text must be the one the text tower reads.
    let mut wrong_eos = tiny_config();
    wrong_eos.model.text_config.eos_token_id = Some(5);
    let err = ClipTask::new(wrong_eos, &tokenizer_dir(), &data, 1e-3, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("eos_token_id"), "{err}");

    // Images of another size than the vision tower's.
    let mut big = tiny_config();
    big.model.vision_config.image_size = 32;
    let err = ClipTask::new(big, &tokenizer_dir(), &data, 1e-3, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("32x32 RGB images"), "{err}");

    // A vocabulary smaller than the tokenizer's.
    let mut small = tiny_config();
    small.model.text_config.vocab_size = 500;
    let err = ClipTask::new(small, &tokenizer_dir(), &data, 1e-3, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vocab_size is 500"), "{err}");

    // No tokenizer files.
    let err = ClipTask::new(
        tiny_config(),
        &fixtures().join("data"),
        &data,
        1e-3,
        0,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("vocab.json"), "{err}");

    // Data without captions: the loader already refuses a tar without them;
    // a dataset that has none (MNIST-like) is refused by the trainer.
    let options = config.recipe.load_options(16);
    let err = data::open(&fixtures().join("data/no_captions.tar"), &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no captions"), "{err}");
    let mut bare = data.clone();
    bare.captions = None;
    let err = ClipTask::new(
        tiny_config(),
        &tokenizer_dir(),
        &bare,
        1e-3,
        0,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("needs captions"), "{err}");

    // Recipe values out of range.
    let mut c = tiny_config();
    c.recipe.style_prob = 1.5;
    assert!(c.validate().is_err());
    let mut c = tiny_config();
    c.recipe.max_text_tokens = 100;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings (77)"), "{err}");
    let mut c = tiny_config();
    c.recipe.style_template = "{caption}".into();
    assert!(c.validate().is_err());
}

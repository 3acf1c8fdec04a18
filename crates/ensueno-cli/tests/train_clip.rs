//! `ensueno train clip`, `eval clip` and `eval text-encoder` end to end on
//! six captioned 16x16 emoji (the committed emoji6.tar) with the tiny CLIP
//! tokenizer, and their bad inputs: one `error:` line, non-zero exit.

use std::path::{Path, PathBuf};
mod common;

use common::{assert_clean_failure, ensueno, stderr};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ensueno/tests/fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny CLIP config (the shape of configs/clip-emoji.json) for 16x16 images.
fn tiny_config(dir: &Path) -> PathBuf {
    let path = dir.join("clip.json");
    std::fs::write(
        &path,
        r#"{
          "model": {
            "text_config": {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
              "projection_dim": 16, "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 999},
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 16, "patch_size": 4, "projection_dim": 16},
            "projection_dim": 16
          },
          "recipe": {"style_prob": 0.5, "style_template": "{caption}, {style} style",
            "max_text_tokens": 16, "weight_decay": 0.0, "lr_warmup_steps": 2,
            "background": [255, 255, 255]},
          "training": {"epochs": 2, "batch_size": 3, "lr": 0.003, "seed": 0}
        }"#,
    )
    .unwrap();
    path
}

/// Paraphrases of emoji6's captions (its metadata has no short names that
/// differ from the captions, so these two are all).
fn paraphrases(dir: &Path) -> PathBuf {
    let path = dir.join("paraphrases.json");
    std::fs::write(
        &path,
        r#"[{"key": "1f418", "text": "a pachyderm"}, {"key": "1f34e", "text": "an apple"}]"#,
    )
    .unwrap();
    path
}

#[test]
fn train_clip_then_score_it_and_a_bert_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("clip");
    let data = fixtures().join("data/emoji6.tar");
    let o = ensueno(&[
        "train",
        "clip",
        "--config",
        s(&tiny_config(tmp.path())),
        "--data",
        s(&data),
        "--tokenizer",
        s(&fixtures().join("tiny_clip_tokenizer")),
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("zero-shot caption -> image |   emoji6 | n 6 of 6"),
        "{stdout}"
    );
    assert!(out.join("model/config.json").is_file());
    assert!(out.join("zero_shot/epoch-002.json").is_file());

    let para = paraphrases(tmp.path());
    let json = tmp.path().join("scores.json");
    let o = ensueno(&[
        "eval",
        "clip",
        "--model",
        s(&out.join("model")),
        "--data",
        s(&data),
        "--n",
        "3",
        "--paraphrases",
        s(&para),
        "--json",
        s(&json),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for line in [
        "text -> image |  training captions |   emoji6 | n    3 of 6",
        "text -> image | unseen paraphrases |   emoji6 | n    2 of 6",
        "image -> caption |  training captions |   emoji6 | n    3 of 6",
        "text -> caption | unseen paraphrases |   emoji6 | n    2 of 6",
    ] {
        assert!(stdout.contains(line), "missing '{line}' in:\n{stdout}");
    }
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(scores["scores"].as_array().unwrap().len(), 5);

    // The same measure for a BERT sentence encoder.
    let o = ensueno(&[
        "eval",
        "text-encoder",
        "--model",
        s(&fixtures().join("bert/tiny")),
        "--data",
        s(&data),
        "--n",
        "3",
        "--paraphrases",
        s(&para),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("text -> caption | unseen paraphrases |   emoji6 | n    2 of 6"),
        "{stdout}"
    );
}

#[test]
fn bad_clip_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("clip");
    let data = fixtures().join("data/emoji6.tar");
    let config = tiny_config(tmp.path());
    let tokenizer = fixtures().join("tiny_clip_tokenizer");
    assert_clean_failure(
        &ensueno(&[
            "train",
            "clip",
            "--config",
            "/no/such/config.json",
            "--tokenizer",
            s(&tokenizer),
            "-o",
            s(&out),
        ]),
        "/no/such/config.json",
    );
    // A folder without vocab.json and merges.txt.
    assert_clean_failure(
        &ensueno(&[
            "train",
            "clip",
            "--config",
            s(&config),
            "--data",
            s(&data),
            "--tokenizer",
            s(tmp.path()),
            "-o",
            s(&out),
        ]),
        "vocab.json",
    );
    // No --tokenizer at all: clap says it is required.
    let o = ensueno(&["train", "clip", "--config", s(&config), "-o", s(&out)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--tokenizer"), "{}", stderr(&o));
    // Not a CLIP folder.
    assert_clean_failure(
        &ensueno(&["eval", "clip", "--model", s(tmp.path()), "--data", s(&data)]),
        "config.json",
    );
    // A paraphrase naming an emoji that is not in the data.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"[{"key": "1f680", "text": "a spaceship"}]"#).unwrap();
    assert_clean_failure(
        &ensueno(&[
            "eval",
            "text-encoder",
            "--model",
            s(&fixtures().join("bert/tiny")),
            "--data",
            s(&data),
            "--paraphrases",
            s(&bad),
        ]),
        "1f680",
    );
}

//! Golden tests for `CLIPTextModel` against transformers' `CLIPTextModel`.
//!
//! Fixtures come from `scripts/golden/clip.py` (tiny random weights).
//! Tolerance: max|ours - ref| / max(max|ref|, 1e-6) <= 1e-4, over the whole
//! output tensor, in f32 on the CPU.

mod common;
use common::rel_err;

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use ensueno::models::clip_text_model::{CLIPTextConfig, CLIPTextModel};
use ensueno::Error;

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip")
        .join(variant)
}

fn load(variant: &str) -> (CLIPTextModel, std::collections::HashMap<String, Tensor>) {
    let dir = fixture(variant);
    let dev = common::device();
    let config = CLIPTextConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
    let model = CLIPTextModel::new(vb, &config).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
    (model, io)
}

fn check_variant(variant: &str) {
    let (model, io) = load(variant);
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let cases = [
        (0, "last_hidden_state"),
        (1, "clip_skip_1"),
        (2, "clip_skip_2"),
    ];
    for (skip, key) in cases {
        let ours = model.forward_with_clip_skip(&ids, skip).unwrap();
        let err = rel_err(&ours, &io[key]);
        eprintln!("{variant} {key}: rel err {err:.3e}");
        assert!(err <= 1e-4, "{variant} {key}: rel err {err}");
    }
    let plain = model.forward(&ids).unwrap();
    assert!(rel_err(&plain, &io["last_hidden_state"]) <= 1e-4);
}

#[test]
fn quick_gelu_sd_layout_matches_transformers() {
    check_variant("quick_gelu");
}

#[test]
fn gelu_root_layout_matches_transformers() {
    check_variant("gelu");
}

#[test]
fn shorter_sequences_and_single_prompt_work() {
    let (model, io) = load("quick_gelu");
    // Causal attention: a prefix of the input gives the prefix of the output.
    let ids = io["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .narrow(0, 1, 1)
        .unwrap()
        .narrow(1, 0, 20)
        .unwrap();
    let ours = model.forward(&ids).unwrap();
    let reference = io["last_hidden_state"]
        .narrow(0, 1, 1)
        .unwrap()
        .narrow(1, 0, 20)
        .unwrap();
    assert!(rel_err(&ours, &reference) <= 1e-4);
}

#[test]
fn too_long_input_is_a_clear_error() {
    let (model, _) = load("gelu");
    let ids = Tensor::zeros((1, 78), DType::U32, &common::device()).unwrap();
    let err = model.forward(&ids).unwrap_err();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    let ids = Tensor::zeros(77, DType::U32, &common::device()).unwrap();
    assert!(matches!(model.forward(&ids), Err(Error::Shape { .. })));
    let ids = Tensor::zeros((1, 5), DType::U32, &common::device()).unwrap();
    assert!(model.forward_with_clip_skip(&ids, 3).is_err());
}

#[test]
fn bad_config_values_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"hidden_act": "swish"}"#).unwrap();
    let err = CLIPTextConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("swish"), "{err}");
    std::fs::write(&path, r#"{"hidden_size": 30, "num_attention_heads": 4}"#).unwrap();
    let err = CLIPTextConfig::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("divisible"), "{err}");
    let err = CLIPTextConfig::from_file(&dir.path().join("missing.json")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn missing_weights_are_an_error() {
    let dev = common::device();
    let config = CLIPTextConfig::from_file(&fixture("gelu").join("config.json")).unwrap();
    let mut weights =
        candle_core::safetensors::load(fixture("gelu").join("model.safetensors"), &dev).unwrap();
    weights.remove("final_layer_norm.weight");
    let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
    assert!(CLIPTextModel::new(vb, &config).is_err());
}

#[test]
fn runs_in_f16_close_to_f32() {
    // Not a golden test: checks the model follows the VarBuilder's dtype.
    // Half precision: loose tolerance 1e-2 relative.
    let dir = fixture("quick_gelu");
    let dev = common::device();
    let config = CLIPTextConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    let model =
        CLIPTextModel::new(VarBuilder::from_tensors(weights, DType::F16, &dev), &config).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let out = model.forward(&ids).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let err = rel_err(&out.to_dtype(DType::F32).unwrap(), &io["last_hidden_state"]);
    assert!(err <= 1e-2, "f16 rel err {err}");
}

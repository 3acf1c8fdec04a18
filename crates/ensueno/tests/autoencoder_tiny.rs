//! Golden tests for `AutoencoderTiny` (TAESD) against diffusers' `AutoencoderTiny`.
//!
//! Fixtures come from `scripts/golden/taesd.py`: tiny random-weight models in
//! diffusers layout (default run), and reference outputs of the real TAESD
//! weights (checked only when `ENSUENO_SHARED` points at the shared folder).
//! Tolerance: max|ours - ref| / max(max|ref|, 1e-6) <= 1e-4 over the whole
//! tensor, in f32 on the CPU (real weights are bf16, converted to f32 on
//! both sides).

mod common;
use common::rel_err;

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use ensueno::models::autoencoder_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use ensueno::Error;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/taesd")
}

fn load_variant(variant: &str) -> (AutoencoderTiny, std::collections::HashMap<String, Tensor>) {
    let dir = fixtures().join(variant);
    let dev = common::device();
    let config = AutoencoderTinyConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)
            .unwrap();
    let model =
        AutoencoderTiny::new(VarBuilder::from_tensors(weights, DType::F32, &dev), &config).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
    (model, io)
}

fn check_variant(variant: &str) {
    let (model, io) = load_variant(variant);
    let latents = model.encode(&io["image"]).unwrap();
    let err = rel_err(&latents, &io["latents"]);
    eprintln!("{variant} encode: rel err {err:.3e}");
    assert!(err <= 1e-4, "{variant} encode rel err {err}");
    let decoded = model.decode(&io["decode_input"]).unwrap();
    let err = rel_err(&decoded, &io["decoded"]);
    eprintln!("{variant} decode: rel err {err:.3e}");
    assert!(err <= 1e-4, "{variant} decode rel err {err}");
}

#[test]
fn tiny_relu_matches_diffusers() {
    check_variant("tiny_relu");
}

#[test]
fn tiny_mish_three_stages_matches_diffusers() {
    check_variant("tiny_mish");
}

#[test]
fn wrong_shapes_and_bad_configs_are_errors() {
    let (model, _) = load_variant("tiny_relu");
    let bad = Tensor::zeros((1, 3, 8, 8), DType::F32, &common::device()).unwrap();
    assert!(matches!(model.decode(&bad), Err(Error::Shape { .. })));
    let bad = Tensor::zeros((3, 16, 16), DType::F32, &common::device()).unwrap();
    assert!(matches!(model.encode(&bad), Err(Error::Shape { .. })));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"act_fn": "tanhshrink"}"#).unwrap();
    let err = AutoencoderTinyConfig::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("tanhshrink"), "{err}");
    std::fs::write(&path, r#"{"num_encoder_blocks": [1, 3, 3]}"#).unwrap();
    let err = AutoencoderTinyConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    let err = AutoencoderTinyConfig::from_file(&dir.path().join("none.json")).unwrap_err();
    assert!(err.to_string().contains("none.json"), "{err}");
}

#[test]
fn scale_and_unscale_latents_round_trip() {
    let (model, io) = load_variant("tiny_relu");
    // Inside the +-3 range that scale_latents keeps.
    let x = io["decode_input"].clamp(-2.9f32, 2.9f32).unwrap();
    let back = model
        .unscale_latents(&model.scale_latents(&x).unwrap())
        .unwrap();
    assert!(rel_err(&back, &x) <= 1e-5);
}

#[test]
fn taesd_files_with_wrong_names_are_model_errors() {
    // A diffusers-layout file is not a TAESD release file.
    let path = fixtures().join("tiny_relu/diffusion_pytorch_model.safetensors");
    let err =
        AutoencoderTiny::from_taesd_files(None, &path, DType::F32, &common::device()).unwrap_err();
    assert!(matches!(err, Error::Model { .. }), "{err}");
    let missing = fixtures().join("missing.safetensors");
    let err = AutoencoderTiny::from_taesd_files(None, &missing, DType::F32, &common::device())
        .unwrap_err();
    assert!(err.to_string().contains("missing.safetensors"), "{err}");
}

#[test]
fn real_taesd_matches_diffusers() {
    let Some(shared) = std::env::var_os("ENSUENO_SHARED") else {
        eprintln!(
            "skipped: set ENSUENO_SHARED to the shared folder to test the real TAESD weights"
        );
        return;
    };
    let dir = PathBuf::from(shared).join("weights/taesd");
    let dev = common::device();
    let io = candle_core::safetensors::load(fixtures().join("real_io.safetensors"), &dev).unwrap();

    let model = AutoencoderTiny::from_taesd_files(
        Some(&dir.join("taesd_encoder.safetensors")),
        &dir.join("taesd_decoder.safetensors"),
        DType::F32,
        &dev,
    )
    .unwrap();
    let decoded = model.decode(&io["latents"]).unwrap();
    let err = rel_err(&decoded, &io["decoded"]);
    eprintln!("real TAESD decode: rel err {err:.3e}");
    assert!(err <= 1e-4, "decode rel err {err}");
    let encoded = model.encode(&io["image"]).unwrap();
    let err = rel_err(&encoded, &io["encoded"]);
    eprintln!("real TAESD encode: rel err {err:.3e}");
    assert!(err <= 1e-4, "encode rel err {err}");

    let decoder_only = AutoencoderTiny::from_taesd_files(
        None,
        &dir.join("taesd_decoder.safetensors"),
        DType::F32,
        &dev,
    )
    .unwrap();
    assert!(!decoder_only.has_encoder());
    assert!(decoder_only.encode(&io["image"]).is_err());
    let again = decoder_only.decode(&io["latents"]).unwrap();
    assert!(rel_err(&again, &io["decoded"]) <= 1e-4);
}

#[test]
fn runs_in_f16_close_to_f32() {
    // Not a golden test: checks the model follows the VarBuilder's dtype.
    // Half precision: loose tolerance 1e-2 relative.
    let dir = fixtures().join("tiny_mish");
    let dev = common::device();
    let config = AutoencoderTinyConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)
            .unwrap();
    let model =
        AutoencoderTiny::new(VarBuilder::from_tensors(weights, DType::F16, &dev), &config).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
    let input = io["decode_input"].to_dtype(DType::F16).unwrap();
    let out = model.decode(&input).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let err = rel_err(&out.to_dtype(DType::F32).unwrap(), &io["decoded"]);
    assert!(err <= 1e-2, "f16 rel err {err}");
}

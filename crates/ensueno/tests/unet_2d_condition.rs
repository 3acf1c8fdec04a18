//! Golden tests of `UNet2DConditionModel` against diffusers 0.42.
//!
//! Fixtures come from `scripts/golden/unet.py` (tiny seeded random UNets with
//! every weight re-initialised to noise). Tolerance: the max relative error
//! `max|ours - ref| / max(max|ref|, 1e-6)` over the whole output must be
//! <= 1e-4.

mod common;
use common::rel_err;

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use ensueno::models::unet_2d_condition::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
use ensueno::Error;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet")
}

fn load_model(name: &str) -> (UNet2DConditionConfig, UNet2DConditionModel) {
    let dir = fixtures().join(name);
    let config = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &common::device(),
    )
    .unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &common::device());
    let model = UNet2DConditionModel::new(vb, &config).unwrap();
    (config, model)
}

fn run_case(model_name: &str, case: &str) {
    let (_, model) = load_model(model_name);
    let io = candle_core::safetensors::load(
        fixtures().join(format!("case_{case}.safetensors")),
        &common::device(),
    )
    .unwrap();
    let out = model
        .forward_with_class_labels(
            &io["sample"],
            &io["timesteps"],
            &io["encoder_hidden_states"],
            io.get("class_labels"),
        )
        .unwrap();
    let err = rel_err(&out, &io["output"]);
    eprintln!("{case}: max relative error {err:e}");
    assert!(
        err <= TOLERANCE,
        "{case}: max relative error {err} > {TOLERANCE}"
    );
}

#[test]
fn sd1_like_matches_diffusers() {
    run_case("sd1", "sd1");
}

#[test]
fn nonsquare_batch2_fractional_timesteps_match_diffusers() {
    run_case("sd1", "sd1_nonsquare_b2");
}

#[test]
fn sd2_like_matches_diffusers() {
    run_case("sd2", "sd2");
}

#[test]
fn sizes_not_multiple_of_upsampling_match_diffusers() {
    run_case("sd2", "sd2_odd");
}

#[test]
fn projection_class_embedding_matches_diffusers() {
    run_case("sd1_class", "sd1_class_b2");
}

#[test]
fn class_labels_missing_misshapen_or_unwanted_are_errors() {
    let (_, model) = load_model("sd1_class");
    assert_eq!(model.class_labels_dim(), Some(12));
    let io = candle_core::safetensors::load(
        fixtures().join("case_sd1_class_b2.safetensors"),
        &common::device(),
    )
    .unwrap();
    let (x, t, enc) = (
        &io["sample"],
        &io["timesteps"],
        &io["encoder_hidden_states"],
    );
    let err = model.forward(x, t, enc).unwrap_err().to_string();
    assert!(err.contains("class_labels"), "{err}");
    let wide = Tensor::zeros((2, 13), DType::F32, &common::device()).unwrap();
    assert!(matches!(
        model.forward_with_class_labels(x, t, enc, Some(&wide)),
        Err(Error::Shape { .. })
    ));
    let (_, plain) = load_model("sd1");
    assert_eq!(plain.class_labels_dim(), None);
    let labels = &io["class_labels"];
    assert!(plain
        .forward_with_class_labels(x, t, enc, Some(labels))
        .is_err());
}

#[test]
fn class_embeddings_other_than_projection_are_refused() {
    let mut config = sd1_config();
    config.class_embed_type = Some("timestep".into());
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    let err = UNet2DConditionModel::new(vb, &config).unwrap_err();
    assert!(err.to_string().contains("class_embed_type"), "{err}");
    config.class_embed_type = Some("projection".into());
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    let err = UNet2DConditionModel::new(vb, &config).unwrap_err();
    assert!(
        err.to_string()
            .contains("projection_class_embeddings_input_dim"),
        "{err}"
    );
}

#[test]
fn timesteps_as_f64_scalar_and_broadcast() {
    let (_, model) = load_model("sd1");
    let io =
        candle_core::safetensors::load(fixtures().join("case_sd1.safetensors"), &common::device())
            .unwrap();
    let t = Tensor::new(500f64, &common::device()).unwrap();
    let out = model
        .forward(&io["sample"], &t, &io["encoder_hidden_states"])
        .unwrap();
    assert!(rel_err(&out, &io["output"]) <= TOLERANCE);
}

#[test]
fn presets_build_configs_for_sd15_and_sd21() {
    let v15 = UNet2DConditionConfig::stable_diffusion_v1_5();
    assert_eq!(v15.cross_attention_dim, OneOrMany::One(768));
    assert_eq!(v15.num_heads_per_block().unwrap(), vec![8; 4]);
    let v21 = UNet2DConditionConfig::stable_diffusion_v2_1();
    assert_eq!(v21.num_heads_per_block().unwrap(), vec![5, 10, 20, 20]);
    assert!(v21.use_linear_projection);
    // Both build (zero weights) without error.
    for config in [v15, v21] {
        let vb = VarBuilder::zeros(DType::F32, &common::device());
        UNet2DConditionModel::new(vb, &config).unwrap();
    }
}

fn sd1_config() -> UNet2DConditionConfig {
    UNet2DConditionConfig::from_file(fixtures().join("sd1/config.json")).unwrap()
}

#[test]
fn unknown_block_type_is_an_error() {
    let mut config = sd1_config();
    config.down_block_types[1] = "SimpleCrossAttnDownBlock2D".to_string();
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    let err = UNet2DConditionModel::new(vb, &config).unwrap_err();
    assert!(matches!(err, Error::UnknownName { .. }), "{err}");
}

#[test]
fn sdxl_addition_embedding_is_an_error() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sd1/config.json")).unwrap())
            .unwrap();
    json["addition_embed_type"] = "text_time".into();
    json["addition_time_embed_dim"] = 256.into();
    let config: UNet2DConditionConfig = serde_json::from_value(json).unwrap();
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    let err = UNet2DConditionModel::new(vb, &config).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("addition_embed_type"), "{err}");
}

#[test]
fn explicit_num_attention_heads_is_refused_like_diffusers() {
    let mut config = sd1_config();
    config.num_attention_heads = Some(OneOrMany::One(8));
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    assert!(UNet2DConditionModel::new(vb, &config).is_err());
}

#[test]
fn per_block_list_of_wrong_length_is_an_error() {
    let mut config = sd1_config();
    config.attention_head_dim = OneOrMany::Many(vec![8, 8, 8]);
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    assert!(matches!(
        UNet2DConditionModel::new(vb, &config),
        Err(Error::Config { .. })
    ));
}

#[test]
fn wrong_inputs_are_shape_errors() {
    let (_, model) = load_model("sd1");
    let dev = common::device();
    let t = Tensor::new(&[10f32], &dev).unwrap();
    let enc = Tensor::zeros((1, 5, 32), DType::F32, &dev).unwrap();
    let bad_channels = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
    assert!(matches!(
        model.forward(&bad_channels, &t, &enc),
        Err(Error::Shape { .. })
    ));
    let sample = Tensor::zeros((2, 4, 8, 8), DType::F32, &dev).unwrap();
    assert!(matches!(
        model.forward(&sample, &t, &enc),
        Err(Error::Shape { .. })
    ));
    let enc_wide = Tensor::zeros((2, 5, 16), DType::F32, &dev).unwrap();
    assert!(matches!(
        model.forward(&sample, &t, &enc_wide),
        Err(Error::Shape { .. })
    ));
    let t3 = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    let enc2 = Tensor::zeros((2, 5, 32), DType::F32, &dev).unwrap();
    assert!(matches!(
        model.forward(&sample, &t3, &enc2),
        Err(Error::Shape { .. })
    ));
}

/// Timing of one forward of the full SD 1.5 UNet (zero weights, batch 2,
/// 4x64x64 latents, 77 tokens). Run with
/// `cargo test -p ensueno --test unet_2d_condition -- --ignored --nocapture`.
#[test]
#[ignore = "slow: full-size SD 1.5 UNet timing"]
fn time_sd15_forward_batch2_64x64() {
    let dev = common::device();
    let config = UNet2DConditionConfig::stable_diffusion_v1_5();
    let vb = VarBuilder::zeros(DType::F32, &dev);
    let model = UNet2DConditionModel::new(vb, &config).unwrap();
    let sample = Tensor::randn(0f32, 1., (2, 4, 64, 64), &dev).unwrap();
    let enc = Tensor::randn(0f32, 1., (2, 77, 768), &dev).unwrap();
    let t = Tensor::new(&[999f32, 999.], &dev).unwrap();
    let start = std::time::Instant::now();
    let out = model.forward(&sample, &t, &enc).unwrap();
    eprintln!(
        "SD 1.5 UNet forward, batch 2, 64x64, 77 tokens: {:.2} s, output {:?}",
        start.elapsed().as_secs_f64(),
        out.dims()
    );
    assert_eq!(out.dims(), &[2, 4, 64, 64]);
}

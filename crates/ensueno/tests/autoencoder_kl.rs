//! Golden tests of `AutoencoderKL` against diffusers 0.42.
//!
//! Fixtures come from `scripts/golden/vae.py` (tiny seeded random VAEs with
//! every weight re-initialised to noise). Tolerance: the max relative error
//! `max|ours - ref| / max(max|ref|, 1e-6)` over each output tensor must be
//! <= 1e-4.

mod common;
use common::rel_err;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use ensueno::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use ensueno::Error;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae")
}

fn weights(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures()
            .join(name)
            .join("diffusion_pytorch_model.safetensors"),
        &common::device(),
    )
    .unwrap()
}

fn config(name: &str) -> AutoencoderKLConfig {
    AutoencoderKLConfig::from_file(fixtures().join(name).join("config.json")).unwrap()
}

fn check(name: &str, weights: HashMap<String, Tensor>) {
    let cfg = config(name);
    let vb = VarBuilder::from_tensors(weights, DType::F32, &common::device());
    let vae = AutoencoderKL::new(vb, &cfg).unwrap();
    let io = candle_core::safetensors::load(
        fixtures().join(format!("case_{name}.safetensors")),
        &common::device(),
    )
    .unwrap();
    let dist = vae.encode(&io["image"]).unwrap();
    let decoded = vae.decode(&io["latent"]).unwrap();
    for (what, ours, reference) in [
        ("mean", dist.mean(), &io["mean"]),
        ("std", dist.std(), &io["std"]),
        ("decoded", &decoded, &io["decoded"]),
    ] {
        let err = rel_err(ours, reference);
        eprintln!("{name} {what}: max relative error {err:e}");
        assert!(err <= TOLERANCE, "{name} {what}: {err} > {TOLERANCE}");
    }
    // sample(0) is the mean; sample(noise) = mean + std * noise.
    let zeros = dist.mean().zeros_like().unwrap();
    assert!(rel_err(&dist.sample(&zeros).unwrap(), dist.mean()) == 0.0);
    let ones = dist.mean().ones_like().unwrap();
    let expected = (dist.mean() + dist.std()).unwrap();
    assert!(rel_err(&dist.sample(&ones).unwrap(), &expected) <= TOLERANCE);
}

#[test]
fn two_block_vae_matches_diffusers() {
    check("two_blocks", weights("two_blocks"));
}

#[test]
fn three_block_vae_without_post_quant_conv_matches_diffusers() {
    check("three_blocks", weights("three_blocks"));
    let vae = config("three_blocks");
    assert_eq!(vae.shift_factor, Some(0.0609));
}

#[test]
fn legacy_attention_key_names_load() {
    // Old checkpoints name the mid-block attention query/key/value/proj_attn.
    let renamed = weights("two_blocks")
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (k, v)
        })
        .collect::<HashMap<_, _>>();
    assert!(renamed.keys().any(|k| k.contains(".proj_attn.")));
    check("two_blocks", renamed);
}

#[test]
fn preset_builds() {
    let cfg = AutoencoderKLConfig::stable_diffusion_v1_5();
    assert_eq!(cfg.scaling_factor, 0.18215);
    let vb = VarBuilder::zeros(DType::F32, &common::device());
    let vae = AutoencoderKL::new(vb, &cfg).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    assert_eq!(vae.shift_factor(), None);
}

#[test]
fn bad_inputs_and_configs_are_errors() {
    let cfg = config("two_blocks");
    let vb = VarBuilder::from_tensors(weights("two_blocks"), DType::F32, &common::device());
    let vae = AutoencoderKL::new(vb, &cfg).unwrap();
    let dev = common::device();
    let gray = Tensor::zeros((1, 1, 32, 32), DType::F32, &dev).unwrap();
    assert!(matches!(vae.encode(&gray), Err(Error::Shape { .. })));
    let bad_latent = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
    assert!(matches!(vae.decode(&bad_latent), Err(Error::Shape { .. })));

    let mut bad = cfg.clone();
    bad.down_block_types[0] = "AttnDownEncoderBlock2D".to_string();
    let vb = VarBuilder::zeros(DType::F32, &dev);
    assert!(matches!(
        AutoencoderKL::new(vb, &bad),
        Err(Error::UnknownName { .. })
    ));
    let mut bad = cfg;
    bad.norm_num_groups = 5;
    let vb = VarBuilder::zeros(DType::F32, &dev);
    assert!(AutoencoderKL::new(vb, &bad).is_err());
}

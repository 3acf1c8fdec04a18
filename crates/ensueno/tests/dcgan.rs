//! Golden tests for the DCGAN generator and discriminator against their
//! PyTorch twins (`scripts/twins/gan.py`).
//!
//! Fixtures come from `scripts/golden/dcgan.py`: a class-conditional and an
//! unconditional tiny model with random weights and random BatchNorm running
//! statistics. Checked, in the order PyTorch ran them: eval-mode outputs
//! (running statistics), train-mode outputs (batch statistics), the two
//! non-saturating losses, the running statistics after the train-mode
//! forwards (momentum 0.1, unbiased variance), and the gradients of the
//! generator loss (generator parameters) and of the discriminator loss
//! (discriminator parameters).
//! Tolerance: max|ours - ref| / max(max|ref|, 1e-6) <= 1e-4 over the whole
//! tensor (`common::rel_err`), f32 on the CPU.

mod common;
use common::{check, rel_err, TOL};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ensueno::models::dcgan::{
    discriminator_loss, generator_loss, DCGANConfig, DCGANDiscriminator, DCGANGenerator,
};
use ensueno::ops::batch_norm::BatchNorm2d;
use ensueno::Error;

fn fixtures(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dcgan")
        .join(variant)
}

/// Builds a network on a fresh VarMap (parameters as variables) and loads
/// the part's weights into it.
fn load<T>(
    dir: &Path,
    build: impl FnOnce(VarBuilder, &DCGANConfig) -> ensueno::Result<T>,
) -> (T, VarMap) {
    let config = DCGANConfig::from_file(&dir.join("config.json")).unwrap();
    let mut varmap = VarMap::new();
    let model = build(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &config,
    )
    .unwrap();
    varmap.load(dir.join("model.safetensors")).unwrap();
    (model, varmap)
}

fn check_stats(prefix: &str, name: &str, bn: &BatchNorm2d, io: &HashMap<String, Tensor>) {
    check(
        &format!("{prefix}.{name}.running_mean"),
        bn.running_mean.as_tensor(),
        &io[&format!("stats.{prefix}.{name}.running_mean")],
    );
    check(
        &format!("{prefix}.{name}.running_var"),
        bn.running_var.as_tensor(),
        &io[&format!("stats.{prefix}.{name}.running_var")],
    );
}

fn check_grads(
    prefix: &str,
    loss: &Tensor,
    varmap: &VarMap,
    io: &HashMap<String, Tensor>,
) -> usize {
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    let key = format!("grad.{prefix}.");
    let mut n = 0;
    for (name, reference) in io.iter().filter(|(k, _)| k.starts_with(&key)) {
        let param = &name[key.len()..];
        let var = vars
            .get(param)
            .unwrap_or_else(|| panic!("no parameter {param}"));
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {param}"));
        let e = rel_err(grad, reference);
        eprintln!("{name}: rel err {e:.3e}");
        assert!(e <= TOL, "{name}: relative error {e:e}");
        n += 1;
    }
    n
}

fn check_variant(variant: &str) {
    let dir = fixtures(variant);
    let (g, g_vars) = load(&dir.join("generator"), DCGANGenerator::new);
    let (d, d_vars) = load(&dir.join("discriminator"), DCGANDiscriminator::new);
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let labels = io.get("labels");
    assert_eq!(labels.is_some(), g.config().num_classes.is_some());

    let fake = g.forward(&io["z"], labels, false).unwrap();
    check("eval.fake", &fake, &io["eval.fake"]);
    let real_logits = d.forward(&io["real"], labels, false).unwrap();
    check("eval.real_logits", &real_logits, &io["eval.real_logits"]);

    let fake = g.forward(&io["z"], labels, true).unwrap();
    check("train.fake", &fake, &io["train.fake"]);
    let real_logits = d.forward(&io["real"], labels, true).unwrap();
    check("train.real_logits", &real_logits, &io["train.real_logits"]);
    let fake_logits = d.forward(&fake, labels, true).unwrap();
    check("train.fake_logits", &fake_logits, &io["train.fake_logits"]);
    let d_loss = discriminator_loss(&real_logits, &fake_logits).unwrap();
    let g_loss = generator_loss(&fake_logits).unwrap();
    check("loss.d", &d_loss, &io["loss.d"]);
    check("loss.g", &g_loss, &io["loss.g"]);

    check_stats("g", "bn0", &g.bn0, &io);
    check_stats("g", "bn1", &g.bn1, &io);
    check_stats("d", "bn2", &d.bn2, &io);

    let n_d = check_grads("d", &d_loss, &d_vars, &io);
    let n_g = check_grads("g", &g_loss, &g_vars, &io);
    assert!(n_d >= 5 && n_g >= 5, "too few gradients: d {n_d}, g {n_g}");
}

#[test]
fn conditional_matches_pytorch() {
    check_variant("conditional");
}

#[test]
fn unconditional_matches_pytorch() {
    check_variant("unconditional");
}

#[test]
fn config_json_round_trips() {
    let config = DCGANConfig::default();
    let json = config.to_json(DCGANConfig::GENERATOR_CLASS_NAME).unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["_class_name"], "DCGANGenerator");
    assert_eq!(value["num_classes"], 10);
    assert_eq!(serde_json::from_str::<DCGANConfig>(&json).unwrap(), config);
    let uncond = DCGANConfig {
        num_classes: None,
        ..Default::default()
    };
    let json = uncond
        .to_json(DCGANConfig::DISCRIMINATOR_CLASS_NAME)
        .unwrap();
    assert!(json.contains("\"num_classes\": null"), "{json}");
    assert_eq!(serde_json::from_str::<DCGANConfig>(&json).unwrap(), uncond);
}

#[test]
fn bad_configs_shapes_and_labels_are_errors() {
    let dev = Device::Cpu;
    let vb = || VarBuilder::zeros(DType::F32, &dev);
    let bad = DCGANConfig {
        sample_size: 30,
        ..Default::default()
    };
    let err = DCGANGenerator::new(vb(), &bad).unwrap_err();
    assert!(err.to_string().contains("divisible by 4"), "{err}");
    let bad = DCGANConfig {
        num_classes: Some(0),
        ..Default::default()
    };
    assert!(DCGANDiscriminator::new(vb(), &bad).is_err());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"base_channels": 0}"#).unwrap();
    assert!(matches!(
        DCGANConfig::from_file(&path).unwrap_err(),
        Error::Config { .. }
    ));

    let config = DCGANConfig {
        latent_dim: 8,
        base_channels: 4,
        ..Default::default()
    };
    let g = DCGANGenerator::new(vb(), &config).unwrap();
    let d = DCGANDiscriminator::new(vb(), &config).unwrap();
    let z = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let labels = Tensor::new(&[3u32, 9], &dev).unwrap();
    assert_eq!(
        g.forward(&z, Some(&labels), false).unwrap().dims(),
        &[2, 1, 28, 28]
    );
    // Missing labels, out-of-range labels, wrong label count, float labels.
    assert!(g.forward(&z, None, false).is_err());
    let out_of_range = Tensor::new(&[3u32, 10], &dev).unwrap();
    let err = g.forward(&z, Some(&out_of_range), false).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let negative = Tensor::new(&[-1i64, 2], &dev).unwrap();
    assert!(g.forward(&z, Some(&negative), false).is_err());
    let three = Tensor::new(&[1u32, 2, 3], &dev).unwrap();
    assert!(matches!(
        g.forward(&z, Some(&three), false).unwrap_err(),
        Error::Shape { .. }
    ));
    let floats = Tensor::new(&[1f32, 2.0], &dev).unwrap();
    assert!(g.forward(&z, Some(&floats), false).is_err());
    // Wrong noise and image shapes.
    let z_bad = Tensor::zeros((2, 9), DType::F32, &dev).unwrap();
    assert!(matches!(
        g.forward(&z_bad, Some(&labels), false).unwrap_err(),
        Error::Shape { .. }
    ));
    let img = Tensor::zeros((2, 3, 28, 28), DType::F32, &dev).unwrap();
    assert!(matches!(
        d.forward(&img, Some(&labels), false).unwrap_err(),
        Error::Shape { .. }
    ));
    let img = Tensor::zeros((2, 1, 28, 28), DType::F32, &dev).unwrap();
    assert_eq!(d.forward(&img, Some(&labels), true).unwrap().dims(), &[2]);
    // Labels given to an unconditional model.
    let uncond = DCGANConfig {
        num_classes: None,
        ..config
    };
    let g = DCGANGenerator::new(vb(), &uncond).unwrap();
    assert!(g.forward(&z, Some(&labels), false).is_err());
}

//! Golden tests for `ConvVAE` (the Keras VAE example) against its PyTorch twin.
//!
//! Fixtures come from `scripts/golden/conv_vae.py` (PyTorch, seeded random
//! weights of `scripts/twins/vae.py`). Checked: the encoder heads, the
//! reparameterised `z`, the decoder logits, the three loss terms, and the
//! gradients of the total loss for parameters of every layer kind (the
//! backward pass of the fast conv / transposed-conv kernels).
//! Tolerance: max|ours - ref| / max(max|ref|, 1e-6) <= 1e-4 over the whole
//! tensor (`common::rel_err`), f32 on the CPU.

mod common;
use common::{check, rel_err, TOL};

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ensueno::models::conv_vae::{bce_with_logits, vae_loss, ConvVAE, ConvVAEConfig};
use ensueno::Error;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conv_vae")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("io.safetensors"), &Device::Cpu).unwrap()
}

/// The model with its parameters as variables (for gradients).
fn load_model() -> (ConvVAE, VarMap) {
    let dev = Device::Cpu;
    let config = ConvVAEConfig::from_file(&fixtures().join("config.json")).unwrap();
    let varmap = VarMap::new();
    let model = ConvVAE::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &config).unwrap();
    let mut varmap = varmap;
    varmap.load(fixtures().join("model.safetensors")).unwrap();
    (model, varmap)
}

#[test]
fn forward_losses_and_gradients_match_pytorch() {
    let (model, varmap) = load_model();
    let io = io();
    let out = model.forward(&io["x"], &io["eps"]).unwrap();
    check("z_mean", &out.z_mean, &io["z_mean"]);
    check("z_log_var", &out.z_log_var, &io["z_log_var"]);
    check("z", &out.z, &io["z"]);
    check("logits", &out.logits, &io["logits"]);
    let decoded = model.decode(&out.z_mean).unwrap();
    check("decoded", &decoded, &io["decoded"]);

    let loss = vae_loss(&io["x"], &out).unwrap();
    check("loss.total", &loss.total, &io["loss.total"]);
    check(
        "loss.reconstruction",
        &loss.reconstruction,
        &io["loss.reconstruction"],
    );
    check("loss.kl", &loss.kl, &io["loss.kl"]);

    let grads = loss.total.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (name, reference) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let param = &name["grad.".len()..];
        let var = vars
            .get(param)
            .unwrap_or_else(|| panic!("no parameter {param}"));
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no grad {param}"));
        let e = rel_err(grad, reference);
        eprintln!("{name}: rel err {e:.3e}");
        assert!(e <= TOL, "{name}: relative error {e:e}");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} gradients in the fixture");
}

#[test]
fn config_round_trips_with_class_name() {
    let config = ConvVAEConfig::default();
    let json = config.to_json().unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["_class_name"], "ConvVAE");
    assert_eq!(value["conv_channels"], serde_json::json!([32, 64]));
    let back: ConvVAEConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    let fixture = ConvVAEConfig::from_file(&fixtures().join("config.json")).unwrap();
    assert_eq!(fixture, config);
}

#[test]
fn bce_from_logits_is_finite_for_large_logits() {
    let logits = Tensor::new(&[-200f32, -5.0, 0.0, 5.0, 200.0], &Device::Cpu).unwrap();
    let t = Tensor::new(&[0f32, 1.0, 0.5, 0.0, 1.0], &Device::Cpu).unwrap();
    let v = bce_with_logits(&logits, &t)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let expect = [0.0, 5.0067153, std::f32::consts::LN_2, 5.0067153, 0.0];
    for (a, b) in v.iter().zip(expect) {
        assert!((a - b).abs() < 1e-5, "{v:?}");
    }
}

#[test]
fn bad_configs_and_shapes_are_errors() {
    let dev = Device::Cpu;
    let vb = || VarBuilder::zeros(DType::F32, &dev);
    let bad = ConvVAEConfig {
        sample_size: 30,
        ..Default::default()
    };
    let err = ConvVAE::new(vb(), &bad).unwrap_err();
    assert!(err.to_string().contains("divisible by 2^2"), "{err}");
    let bad = ConvVAEConfig {
        latent_dim: 0,
        ..Default::default()
    };
    assert!(ConvVAE::new(vb(), &bad).is_err());
    let bad = ConvVAEConfig {
        conv_channels: vec![],
        ..Default::default()
    };
    assert!(ConvVAE::new(vb(), &bad).is_err());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"sample_size": 27}"#).unwrap();
    let err = ConvVAEConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");

    let model = ConvVAE::new(vb(), &ConvVAEConfig::default()).unwrap();
    let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &dev).unwrap();
    let eps = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
    assert!(matches!(
        model.forward(&x, &eps).unwrap_err(),
        Error::Shape { .. }
    ));
    let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &dev).unwrap();
    let eps3 = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
    assert!(matches!(
        model.forward(&x, &eps3).unwrap_err(),
        Error::Shape { .. }
    ));
    let z = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    assert!(matches!(model.decode(&z).unwrap_err(), Error::Shape { .. }));
    // A well-shaped call works.
    let out = model.forward(&x, &eps).unwrap();
    assert_eq!(out.logits.dims(), &[2, 1, 28, 28]);
}

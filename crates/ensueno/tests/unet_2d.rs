//! Golden tests of `UNet2DModel` (the DDPM pixel-space UNet) against
//! diffusers 0.42.
//!
//! Fixtures come from `scripts/golden/unet_2d.py` (tiny seeded random UNets
//! with every weight re-initialised to noise). Tolerance: the max relative
//! error `max|ours - ref| / max(max|ref|, 1e-6)` over the whole output must
//! be <= 1e-4.

mod common;
use common::{rel_err, TOL};

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ensueno::models::unet_2d::{UNet2DConfig, UNet2DModel};
use ensueno::Error;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet_2d")
        .join(case)
}

fn load(case: &str) -> (UNet2DModel, std::collections::HashMap<String, Tensor>) {
    let dir = fixture(case);
    let config = UNet2DConfig::from_file(dir.join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &common::device(),
    )
    .unwrap();
    let model = UNet2DModel::new(
        VarBuilder::from_tensors(weights, DType::F32, &common::device()),
        &config,
    )
    .unwrap();
    let io =
        candle_core::safetensors::load(dir.join("case.safetensors"), &common::device()).unwrap();
    (model, io)
}

fn run_case(case: &str) {
    let (model, io) = load(case);
    let out = model
        .forward(&io["sample"], &io["timesteps"], Some(&io["class_labels"]))
        .unwrap();
    let err = rel_err(&out, &io["output"]);
    eprintln!("{case}: max relative error {err:e}");
    assert!(err <= TOL, "{case}: max relative error {err} > {TOL}");
}

#[test]
fn class_conditional_matches_diffusers() {
    run_case("class");
}

#[test]
fn variant_settings_match_diffusers() {
    run_case("variant");
}

#[test]
fn class_labels_must_match_the_config() {
    let (model, io) = load("class");
    let err = model
        .forward(&io["sample"], &io["timesteps"], None)
        .unwrap_err();
    assert!(err.to_string().contains("class_labels"), "{err}");
    let out_of_range = Tensor::new(&[7u32, 0], &common::device()).unwrap();
    let err = model
        .forward(&io["sample"], &io["timesteps"], Some(&out_of_range))
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");

    let config = UNet2DConfig {
        num_class_embeds: None,
        ..UNet2DConfig::from_file(fixture("class").join("config.json")).unwrap()
    };
    let unconditional =
        UNet2DModel::new(VarBuilder::zeros(DType::F32, &common::device()), &config).unwrap();
    let err = unconditional
        .forward(&io["sample"], &io["timesteps"], Some(&io["class_labels"]))
        .unwrap_err();
    assert!(err.to_string().contains("no class embedding"), "{err}");
}

#[test]
fn unsupported_config_is_refused() {
    let vb = || VarBuilder::zeros(DType::F32, &common::device());
    let fourier = UNet2DConfig {
        time_embedding_type: "fourier".to_string(),
        ..UNet2DConfig::ddpm_mnist_class_conditional()
    };
    let err = UNet2DModel::new(vb(), &fourier).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("fourier"), "{err}");

    let bad_groups = UNet2DConfig {
        norm_num_groups: 5,
        ..UNet2DConfig::ddpm_mnist_class_conditional()
    };
    assert!(UNet2DModel::new(vb(), &bad_groups).is_err());

    let bad_block = UNet2DConfig {
        down_block_types: vec!["SkipDownBlock2D".to_string(), "DownBlock2D".to_string()],
        ..UNet2DConfig::ddpm_mnist_class_conditional()
    };
    let err = UNet2DModel::new(vb(), &bad_block).unwrap_err();
    assert!(err.to_string().contains("SkipDownBlock2D"), "{err}");
}

#[test]
fn wrong_sample_shape_is_an_error() {
    let (model, io) = load("class");
    let sample = Tensor::zeros((2, 5, 8, 8), DType::F32, &common::device()).unwrap();
    let err = model
        .forward(&sample, &io["timesteps"], Some(&io["class_labels"]))
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
}

/// The model trains: gradients reach every parameter and an AdamW step on
/// the noise-prediction loss lowers it.
#[test]
fn trains_with_autograd() {
    use candle_nn::Optimizer;
    let dev = common::device();
    let config = UNet2DConfig::from_file(fixture("class").join("config.json")).unwrap();
    let varmap = VarMap::new();
    let model =
        UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &config).unwrap();
    let x = Tensor::randn(0f32, 1., (4, 3, 8, 8), &dev).unwrap();
    let noise = Tensor::randn(0f32, 1., (4, 3, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[1f32, 250., 500., 999.], &dev).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 4], &dev).unwrap();
    let loss = |m: &UNet2DModel| {
        candle_nn::loss::mse(&m.forward(&x, &t, Some(&labels)).unwrap(), &noise).unwrap()
    };
    let l0 = loss(&model);
    let grads = l0.backward().unwrap();
    let vars = varmap.all_vars();
    let missing = vars
        .iter()
        .filter(|v| grads.get(v.as_tensor()).is_none())
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} parameters got no gradient",
        vars.len()
    );
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let first = l0.to_scalar::<f32>().unwrap();
    for _ in 0..5 {
        opt.backward_step(&loss(&model)).unwrap();
    }
    let last = loss(&model).to_scalar::<f32>().unwrap();
    assert!(last < first, "loss did not decrease: {first} -> {last}");
}

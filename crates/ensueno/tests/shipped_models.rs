//! The models shipped in `models/` load and compute what the reference
//! implementations compute on the same files: diffusers' `DDPMPipeline`
//! (UNet2DModel + DDIM with classifier-free guidance) for
//! `models/mnist-diffusion`, the PyTorch twin for `models/mnist-vae`
//! (reference values: `scripts/golden/shipped_mnist.py`).
//!
//! Tolerances: one UNet evaluation and the encoder/decoder outputs, relative
//! error max|ours - ref| / max|ref| <= 1e-4 (`common::check`); a whole
//! 10-step guided DDIM loop, max absolute pixel difference <= 2e-3 on [0, 1]
//! images (f32 rounding compounds over the steps and the guidance).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::check;
use ensueno::pipelines::pixel_diffusion::{PixelDiffusionPipeline, PixelSampleRequest};
use ensueno::pipelines::trained_model::TrainedModel;
use ensueno::schedulers::SchedulerKind;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/shipped")
        .join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture")
}

#[test]
fn mnist_diffusion_matches_diffusers() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let pipe = PixelDiffusionPipeline::load(&repo().join("models/mnist-diffusion"), &dev)?;
    let f = fixture("mnist_diffusion.safetensors");
    let labels = f["labels"].to_dtype(DType::U32)?;
    let eps = pipe.unet.forward(&f["x"], &f["t"], Some(&labels))?;
    check("UNet eps", &eps, &f["eps"]);

    let classes: Vec<u32> = f["classes"].to_dtype(DType::U32)?.to_vec1()?;
    let images = pipe.generate(
        &PixelSampleRequest {
            classes: Some(classes),
            n: 0,
            seed: 0,
            steps: Some(10),
            guidance_scale: None,
            scheduler: Some(SchedulerKind::Ddim),
            initial_noise: Some(f["noise"].clone()),
        },
        &mut |_, _| Ok(()),
    )?;
    let diff = (images - &f["images"])?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff <= 2e-3, "guided DDIM images differ by {diff}");
    Ok(())
}

#[test]
fn mnist_vae_matches_its_pytorch_twin() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (model, _) = TrainedModel::load(&repo().join("models/mnist-vae"), &dev)?;
    let TrainedModel::Vae { model, .. } = model else {
        panic!("models/mnist-vae is not a VAE");
    };
    let f = fixture("mnist_vae.safetensors");
    check("decoded", &model.decode(&f["z"])?, &f["decoded"]);
    let (mean, logvar) = model.encode(&f["x"])?;
    check("z_mean", &mean, &f["z_mean"]);
    check("z_log_var", &logvar, &f["z_log_var"]);
    Ok(())
}

#[test]
fn shipped_models_refuse_bad_requests() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (model, _) = TrainedModel::load(&repo().join("models/mnist-diffusion"), &dev)?;
    assert_eq!(model.class_names().len(), 10);
    let settings = Default::default();
    let err = match model.sample(Some(&[10]), 1, 0, &settings, &mut |_, _| Ok(())) {
        Ok(_) => panic!("class 10 is out of range"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("out of range"), "{err}");
    let (vae, _) = TrainedModel::load(&repo().join("models/mnist-vae"), &dev)?;
    assert!(vae
        .sample(Some(&[1]), 1, 0, &settings, &mut |_, _| Ok(()))
        .is_err());
    let img = vae.sample(None, 4, 0, &settings, &mut |_, _| Ok(()))?;
    assert_eq!(img.dims(), &[4, 1, 28, 28]);
    Ok(())
}

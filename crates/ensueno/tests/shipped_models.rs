//! The models shipped in `models/` load and compute what the reference
//! implementations compute on the same files: diffusers' `DDPMPipeline`
//! (UNet2DModel + DDIM with classifier-free guidance) for
//! `models/mnist-diffusion`, the PyTorch twin for `models/mnist-vae`
//! (reference values: `scripts/golden/shipped_mnist.py`), and diffusers'
//! own `StableDiffusionPipeline` loading `models/emoji-text2image` as it is
//! (`scripts/golden/shipped_text2image.py`).
//!
//! Tolerances: one UNet evaluation and the encoder/decoder outputs, relative
//! error max|ours - ref| / max|ref| <= 1e-4 (`common::check`); a whole
//! 10-step guided DDIM loop, max absolute pixel difference <= 2e-3 on [0, 1]
//! images (f32 rounding compounds over the steps and the guidance). The
//! emoji model's whole generations: max |ours - diffusers| <= 3/255 and mean
//! <= 0.5/255 on the float image in [0, 1] before 8-bit rounding, as for
//! the pipeline tests.

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

#[derive(serde::Deserialize)]
struct EmojiCases {
    cases: Vec<EmojiCase>,
}

#[derive(serde::Deserialize)]
struct EmojiCase {
    name: String,
    prompt: String,
    negative_prompt: String,
    scheduler: String,
    steps: usize,
    guidance_scale: f64,
}

#[test]
fn emoji_text2image_matches_diffusers() -> anyhow::Result<()> {
    use ensueno::io::model_folder::ModelFolder;
    use ensueno::pipelines::{
        GenerationInputs, GenerationRequest, Limits, StableDiffusionPipeline,
    };
    let dev = Device::Cpu;
    // ENSUENO_EMOJI_MODEL checks a candidate before it is shipped.
    let root = std::env::var_os("ENSUENO_EMOJI_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/emoji-text2image"));
    let folder = ModelFolder::open(
        &root,
        &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    )?;
    let pipe = StableDiffusionPipeline::load(&folder, &dev, DType::F32)?;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shipped");
    let cases: EmojiCases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("emoji_cases.json"))?)?;
    for case in &cases.cases {
        let latents =
            ensueno::io::npy::read_npy(&dir.join(format!("{}.latents.npy", case.name)), &dev)?;
        let mut request = GenerationRequest::new(case.prompt.clone());
        request.negative_prompt = case.negative_prompt.clone();
        request.steps = case.steps;
        request.guidance_scale = case.guidance_scale;
        request.scheduler = case.scheduler.parse()?;
        request.seed = Some(0);
        let mut last = None;
        pipe.generate(
            &request,
            GenerationInputs {
                latents: Some(latents),
                ..Default::default()
            },
            &Limits::default(),
            &mut |p| {
                last = Some(p.latents.clone());
                true
            },
        )?;
        // The float image before 8-bit rounding, decoded as the pipeline does
        // (TAESD latents need no scaling).
        let latents = last.expect("at least one step");
        let decoded = match &pipe.vae {
            ensueno::pipelines::stable_diffusion::Vae::Tiny(vae) => vae.decode(&latents)?,
            _ => anyhow::bail!("the emoji model's VAE should be AutoencoderTiny"),
        };
        let ours = ((decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let expected = fixture(&format!("{}.expected.safetensors", case.name))["image"].clone();
        let diff = (ours - expected)?.abs()?;
        let max = diff.max_all()?.to_scalar::<f32>()?;
        let mean = diff.mean_all()?.to_scalar::<f32>()?;
        eprintln!("{}: max {max:.2e}, mean {mean:.2e}", case.name);
        assert!(max <= 3.0 / 255.0, "{}: max difference {max}", case.name);
        assert!(mean <= 0.5 / 255.0, "{}: mean difference {mean}", case.name);
    }
    Ok(())
}

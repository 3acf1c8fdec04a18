//! Whole-pipeline golden tests: our txt2img against diffusers'
//! StableDiffusionPipeline on tiny random-weight SD1-like and SD2-like models,
//! from the same initial latents (fixtures made by scripts/golden/pipeline.py).
//!
//! Tolerance (the project's target for real checkpoints): on the float image
//! in [0, 1], max |ours - diffusers| <= 3/255 and mean <= 0.5/255; on 8-bit
//! pixels, max difference <= 3.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use ensueno::io::model_folder::ModelFolder;
use ensueno::io::npy::read_npy;
use ensueno::pipelines::{GenerationInputs, GenerationRequest, Limits, StableDiffusionPipeline};
use serde::Deserialize;

#[derive(Deserialize)]
struct Index {
    cases: Vec<Case>,
    img2img_cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    scheduler: String,
    prompt: String,
    negative_prompt: String,
    steps: usize,
    guidance_scale: f64,
    batch: usize,
    height: usize,
    width: usize,
    clip_skip: usize,
    #[serde(default)]
    strength: f64,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

/// Compares 8-bit images with the reference's (CHW) pixels and float image;
/// returns a report line.
fn compare(
    name: &str,
    images: &[image::RgbImage],
    expected: &std::collections::HashMap<String, Tensor>,
    width: usize,
    height: usize,
) -> String {
    let want = expected["images"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want_px = expected["pixels"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut got = Vec::new();
    for img in images {
        assert_eq!(
            (img.width() as usize, img.height() as usize),
            (width, height)
        );
        let t = Tensor::from_vec(
            img.as_raw().iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (height, width, 3),
            &common::device(),
        )
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        got.extend(t);
    }
    assert_eq!(got.len(), want_px.len());
    let max_px = got
        .iter()
        .zip(&want_px)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let mean_px = got
        .iter()
        .zip(&want_px)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / got.len() as f32;
    // Our 8-bit output against the reference's float image: bounded by the
    // rounding (0.5/255) plus the real error.
    let max_f = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a / 255.0 - b).abs())
        .fold(0f32, f32::max);
    assert!(max_px <= 3.0, "{name}: max pixel difference {max_px} > 3");
    assert!(
        mean_px <= 0.5,
        "{name}: mean pixel difference {mean_px} > 0.5"
    );
    assert!(max_f <= 3.5 / 255.0, "{name}: max float difference {max_f}");
    format!("{name}: max {max_px} mean {mean_px:.4} (8-bit), max {max_f:.5} (float)")
}

fn load(model: &str) -> StableDiffusionPipeline {
    let folder = ModelFolder::open(
        &fixtures().join(model),
        &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    )
    .unwrap();
    StableDiffusionPipeline::load(&folder, &common::device(), DType::F32).unwrap()
}

#[test]
fn txt2img_matches_diffusers() {
    let index: Index =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap())
            .unwrap();
    assert!(index.cases.len() >= 8);
    let mut pipelines = std::collections::HashMap::new();
    let mut report = Vec::new();
    for case in &index.cases {
        let pipeline = pipelines
            .entry(case.model.clone())
            .or_insert_with(|| load(&case.model));
        let request = GenerationRequest {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            steps: case.steps,
            guidance_scale: case.guidance_scale,
            scheduler: case.scheduler.parse().unwrap(),
            width: Some(case.width),
            height: Some(case.height),
            seed: Some(0),
            batch: case.batch,
            strength: 0.75,
            clip_skip: case.clip_skip,
        };
        let latents = read_npy(
            &fixtures().join(format!("{}.latents.npy", case.name)),
            &common::device(),
        )
        .unwrap();
        let mut steps_seen = 0;
        let out = pipeline
            .generate(
                &request,
                GenerationInputs {
                    latents: Some(latents),
                    ..Default::default()
                },
                &Limits::default(),
                &mut |p| {
                    steps_seen = p.step;
                    true
                },
            )
            .unwrap();
        assert_eq!(steps_seen, case.steps, "{}", case.name);
        let expected = candle_core::safetensors::load(
            fixtures().join(format!("{}.expected.safetensors", case.name)),
            &common::device(),
        )
        .unwrap();
        assert_eq!(out.images.len(), case.batch);
        report.push(compare(
            &case.name,
            &out.images,
            &expected,
            case.width,
            case.height,
        ));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn img2img_matches_diffusers() {
    let index: Index =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap())
            .unwrap();
    assert!(index.img2img_cases.len() >= 3);
    let init = image::open(fixtures().join("init.png")).unwrap().to_rgb8();
    let mut report = Vec::new();
    for case in &index.img2img_cases {
        let pipeline = load(&case.model);
        let request = GenerationRequest {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            steps: case.steps,
            guidance_scale: case.guidance_scale,
            scheduler: case.scheduler.parse().unwrap(),
            width: None,
            height: None,
            seed: Some(0),
            batch: 1,
            strength: case.strength,
            clip_skip: 0,
        };
        let npy = |what: &str| {
            read_npy(
                &fixtures().join(format!("{}.{what}.npy", case.name)),
                &common::device(),
            )
            .unwrap()
        };
        let mut steps_seen = 0;
        let out = pipeline
            .generate(
                &request,
                GenerationInputs {
                    init_image: Some(init.clone()),
                    latents: Some(npy("noise")),
                    posterior_noise: Some(npy("posterior")),
                },
                &Limits::default(),
                &mut |_| {
                    steps_seen += 1;
                    true
                },
            )
            .unwrap();
        // diffusers: int(steps * strength) denoising steps.
        assert_eq!(
            steps_seen,
            (case.steps as f64 * case.strength) as usize,
            "{}",
            case.name
        );
        let expected = candle_core::safetensors::load(
            fixtures().join(format!("{}.expected.safetensors", case.name)),
            &common::device(),
        )
        .unwrap();
        report.push(compare(&case.name, &out.images, &expected, 64, 64));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn same_seed_same_image_and_batch_images_reproduce_alone() {
    let pipeline = load("tiny-sd1");
    let mut request = GenerationRequest::new("a red apple");
    request.steps = 3;
    request.seed = Some(1234);
    request.batch = 2;
    request.scheduler = ensueno::schedulers::SchedulerKind::EulerAncestral;
    let run = |r: &GenerationRequest| {
        pipeline
            .generate(
                r,
                GenerationInputs::default(),
                &Limits::default(),
                &mut |_| true,
            )
            .unwrap()
    };
    let a = run(&request);
    let b = run(&request);
    assert_eq!(a.images, b.images);
    assert_eq!(a.seeds, vec![1234, 1235]);
    assert_ne!(a.images[0], a.images[1]);
    let mut alone = request.clone();
    alone.batch = 1;
    alone.seed = Some(1235);
    let c = run(&alone);
    if common::device().is_cpu() {
        assert_eq!(c.images[0], a.images[1]);
    } else {
        // cuBLAS picks its kernels by problem size, so batch 1 and batch 2
        // round differently (as in PyTorch); the H100 run of 2026-11-22
        // found the images unequal to the bit. Same picture within 8-bit
        // rounding of a few ulps is what a GPU promises.
        let worst = c.images[0]
            .as_raw()
            .iter()
            .zip(a.images[1].as_raw())
            .map(|(&x, &y)| x.abs_diff(y))
            .max()
            .unwrap();
        assert!(
            worst <= 2,
            "batch image vs alone: max difference {worst} levels"
        );
    }
}

#[test]
fn img2img_keeps_the_image_at_strength_zero_and_changes_it_at_one() {
    let pipeline = load("tiny-sd1");
    let init = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    let mut request = GenerationRequest::new("a painting");
    request.steps = 4;
    request.seed = Some(7);
    let run = |strength: f64| {
        let mut r = request.clone();
        r.strength = strength;
        let mut steps = 0;
        let out = pipeline
            .generate(
                &r,
                GenerationInputs {
                    init_image: Some(init.clone()),
                    ..Default::default()
                },
                &Limits::default(),
                &mut |_| {
                    steps += 1;
                    true
                },
            )
            .unwrap();
        (out, steps)
    };
    let (zero, steps0) = run(0.0);
    assert_eq!(steps0, 0);
    let (half, steps_half) = run(0.5);
    assert_eq!(steps_half, 2);
    let (full, steps1) = run(1.0);
    assert_eq!(steps1, 4);
    assert_eq!((zero.width, zero.height), (64, 64));
    let diff = |a: &image::RgbImage, b: &image::RgbImage| {
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (*x as f32 - *y as f32).abs())
            .sum::<f32>()
    };
    // With more strength the result moves further from the VAE round trip.
    assert!(diff(&zero.images[0], &half.images[0]) > 0.0);
    assert!(diff(&zero.images[0], &full.images[0]) > diff(&zero.images[0], &half.images[0]) * 0.5);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let pipeline = load("tiny-sd1");
    let base = GenerationRequest::new("x");
    let gen = |r: &GenerationRequest, inputs: GenerationInputs| {
        pipeline
            .generate(r, inputs, &Limits::default(), &mut |_| true)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let wrong = Tensor::zeros((1, 4, 7, 8), DType::F32, &common::device()).unwrap();
    let e = gen(
        &base,
        GenerationInputs {
            latents: Some(wrong),
            ..Default::default()
        },
    );
    assert!(e.contains("initial latents"), "{e}");
    let mut r = base.clone();
    r.width = Some(60);
    assert!(gen(&r, GenerationInputs::default()).contains("multiple of 8"));
    let mut r = base.clone();
    r.steps = 2;
    let cancelled = pipeline
        .generate(
            &r,
            GenerationInputs::default(),
            &Limits::default(),
            &mut |p| p.step < 1,
        )
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(cancelled, ensueno::Error::Cancelled));
}

#[test]
fn released_text_encoder_gives_a_clear_error_on_reuse() {
    let mut pipeline = load("tiny-sd1");
    pipeline.release_text_encoder_after_use(true);
    let mut request = GenerationRequest::new("a cat");
    request.steps = 1;
    request.seed = Some(3);
    let first = pipeline.generate(
        &request,
        GenerationInputs::default(),
        &Limits::default(),
        &mut |_| true,
    );
    assert!(first.is_ok());
    let again = pipeline
        .generate(
            &request,
            GenerationInputs::default(),
            &Limits::default(),
            &mut |_| true,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(again.contains("text encoder was released"), "{again}");
}

//! Golden tests of the noise schedulers against diffusers 0.42.
//!
//! Fixtures come from `scripts/golden/schedulers.py` (diffusers itself): per
//! case the timesteps, sigmas, alphas_cumprod, init_noise_sigma and two
//! trajectories (text-to-image from the first step; image-to-image entered at
//! `begin_index` through `add_noise`) driven by recorded random model outputs
//! and, for the stochastic schedulers, the exact noise diffusers added.
//!
//! Trajectories are replayed free-running: each step gets our own previous
//! sample, not diffusers', so errors would accumulate rather than be reset.
//!
//! Tolerances:
//! - tensors (scaled model input, prev_sample, pred_original_sample, add_noise
//!   output): max|ours - ref| / max(max|ref|, 1e-6) <= 1e-4 per tensor;
//! - integer timesteps: exactly equal; fractional ones (Euler with Karras
//!   sigmas, Euler "linspace"): |ours - ref| <= 1e-6 * max(|ref|, 1);
//! - sigmas, alphas_cumprod, init_noise_sigma: relative 1e-5 per value (they are
//!   float32 in diffusers; ours reproduce the float32 construction).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ensueno::schedulers::ddim::DDIMScheduler;
use ensueno::schedulers::ddpm::DDPMScheduler;
use ensueno::schedulers::dpm_solver_multistep::DPMSolverMultistepScheduler;
use ensueno::schedulers::euler_ancestral::EulerAncestralDiscreteScheduler;
use ensueno::schedulers::euler_discrete::EulerDiscreteScheduler;
use ensueno::schedulers::{build_scheduler, Scheduler, SchedulerConfig, SchedulerKind};
use ensueno::Error;

const TENSOR_TOL: f64 = 1e-4;
const SCHEDULE_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

#[derive(Debug, serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    config: SchedulerConfig,
    num_inference_steps: usize,
    begin_index: usize,
    init_noise_sigma: f64,
    stochastic: bool,
    file: String,
}

#[derive(Debug, serde::Deserialize)]
struct Index {
    cases: Vec<Case>,
}

fn load_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let index: Index = serde_json::from_str(&text).unwrap();
    index.cases
}

/// max|a - b| / max(max|b|, 1e-6).
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let a = ours
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = reference
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-6);
    diff / scale
}

fn vec64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn assert_values(case: &str, what: &str, ours: &[f64], reference: &[f64], tol: f64) {
    assert_eq!(ours.len(), reference.len(), "{case}: {what} length");
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let err = (a - b).abs() / b.abs().max(1e-12);
        assert!(
            err <= tol || a == b,
            "{case}: {what}[{i}] ours {a} vs diffusers {b} (rel {err:e})"
        );
    }
}

fn assert_timesteps(case: &str, ours: &[f64], reference: &[f64]) {
    assert_eq!(
        ours.len(),
        reference.len(),
        "{case}: timesteps length\nours {ours:?}\nref  {reference:?}"
    );
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        if b.fract() == 0.0 {
            assert_eq!(
                a, b,
                "{case}: timesteps[{i}]\nours {ours:?}\nref  {reference:?}"
            );
        } else {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{case}: timesteps[{i}] ours {a} vs {b}"
            );
        }
    }
}

/// The schedule arrays of the concrete type: (alphas_cumprod, sigmas).
fn schedule_arrays(case: &Case) -> (Vec<f64>, Option<Vec<f64>>) {
    let c = &case.config;
    let n = case.num_inference_steps;
    match case.kind.as_str() {
        "ddim" => {
            let s = DDIMScheduler::new(c).unwrap();
            (s.alphas_cumprod().to_vec(), None)
        }
        "ddpm" => {
            let s = DDPMScheduler::new(c).unwrap();
            (s.alphas_cumprod().to_vec(), None)
        }
        "euler" => {
            let mut s = EulerDiscreteScheduler::new(c).unwrap();
            s.set_timesteps(n).unwrap();
            (s.alphas_cumprod().to_vec(), Some(s.sigmas().to_vec()))
        }
        "euler-a" => {
            let mut s = EulerAncestralDiscreteScheduler::new(c).unwrap();
            s.set_timesteps(n).unwrap();
            (s.alphas_cumprod().to_vec(), Some(s.sigmas().to_vec()))
        }
        "dpm++2m" => {
            let mut s = DPMSolverMultistepScheduler::new(c).unwrap();
            s.set_timesteps(n).unwrap();
            (s.alphas_cumprod().to_vec(), Some(s.sigmas().to_vec()))
        }
        k => panic!("unknown kind {k}"),
    }
}

struct Worst(f64, String);

impl Worst {
    fn check(&mut self, case: &str, what: String, ours: &Tensor, reference: &Tensor) {
        let e = rel_err(ours, reference);
        assert!(
            e <= TENSOR_TOL,
            "{case}: {what}: relative error {e:e} > {TENSOR_TOL:e}"
        );
        if e > self.0 {
            *self = Worst(e, format!("{case} {what}"));
        }
    }
}

/// Runs the steps `start..` of a trajectory and compares each step's outputs
/// with the `prefix`ed reference tensors.
#[allow(clippy::too_many_arguments)]
fn replay(
    case: &Case,
    sched: &mut dyn Scheduler,
    t: &HashMap<String, Tensor>,
    prefix: &str,
    start: usize,
    mut sample: Tensor,
    worst: &mut Worst,
) {
    let timesteps = sched.timesteps().to_vec();
    let name = case.name.as_str();
    for (k, i) in (start..timesteps.len()).enumerate() {
        let ts = timesteps[i];
        let scaled = sched.scale_model_input(sample.clone(), ts).unwrap();
        worst.check(
            name,
            format!("{prefix}scaled_model_input[{i}]"),
            &scaled,
            &t[&format!("{prefix}scaled_model_input")].get(k).unwrap(),
        );
        let model_output = t["model_output"].get(i).unwrap();
        let noise = case.stochastic.then(|| t["noise"].get(i).unwrap());
        let out = sched
            .step(&model_output, ts, &sample, noise.as_ref())
            .unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
        worst.check(
            name,
            format!("{prefix}prev_sample[{i}]"),
            &out.prev_sample,
            &t[&format!("{prefix}prev_sample")].get(k).unwrap(),
        );
        if let Some(reference) = t.get(&format!("{prefix}pred_original_sample")) {
            let ours = out
                .pred_original_sample
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no pred_original_sample"));
            worst.check(
                name,
                format!("{prefix}pred_original_sample[{i}]"),
                ours,
                &reference.get(k).unwrap(),
            );
        }
        sample = out.prev_sample;
    }
}

#[test]
fn schedulers_match_diffusers() {
    let cases = load_cases();
    assert!(cases.len() >= 30, "fixtures missing: {}", cases.len());
    let mut worst = Worst(0.0, String::new());
    for case in &cases {
        let name = case.name.as_str();
        let t = candle_core::safetensors::load(fixtures().join(&case.file), &Device::Cpu).unwrap();
        let kind: SchedulerKind = case.kind.parse().unwrap();

        let (alphas_cumprod, sigmas) = schedule_arrays(case);
        assert_values(
            name,
            "alphas_cumprod",
            &alphas_cumprod,
            &vec64(&t["alphas_cumprod"]),
            SCHEDULE_TOL,
        );
        if let Some(sigmas) = sigmas {
            assert_values(name, "sigmas", &sigmas, &vec64(&t["sigmas"]), SCHEDULE_TOL);
        }

        // Text-to-image.
        let mut sched = build_scheduler(kind, &case.config).unwrap();
        sched.set_timesteps(case.num_inference_steps).unwrap();
        assert_timesteps(name, sched.timesteps(), &vec64(&t["timesteps"]));
        assert_values(
            name,
            "init_noise_sigma",
            &[sched.init_noise_sigma()],
            &[case.init_noise_sigma],
            SCHEDULE_TOL,
        );
        assert_eq!(
            sched.is_stochastic(),
            case.stochastic,
            "{name}: is_stochastic"
        );
        replay(
            case,
            sched.as_mut(),
            &t,
            "",
            0,
            t["start_sample"].clone(),
            &mut worst,
        );

        // Image-to-image entered at begin_index.
        let mut sched = build_scheduler(kind, &case.config).unwrap();
        sched.set_timesteps(case.num_inference_steps).unwrap();
        let b = case.begin_index;
        sched.set_begin_index(b);
        let t_begin = sched.timesteps()[b];
        let noisy = sched
            .add_noise(&t["original"], &t["img_noise"], t_begin)
            .unwrap();
        worst.check(
            name,
            "img2img add_noise".into(),
            &noisy,
            &t["img2img_noisy"],
        );
        replay(case, sched.as_mut(), &t, "img2img_", b, noisy, &mut worst);
        eprintln!("ok {name}");
    }
    eprintln!(
        "{} cases; worst relative error {:e} ({})",
        cases.len(),
        worst.0,
        worst.1
    );
}

fn sd15() -> SchedulerConfig {
    SchedulerConfig::stable_diffusion_v1()
}

#[test]
fn unknown_config_values_are_errors() {
    for kind in SchedulerKind::ALL {
        let mut c = sd15();
        c.beta_schedule = Some("cubic".into());
        let err = build_scheduler(kind, &c)
            .err()
            .expect("unknown beta_schedule accepted");
        assert!(
            matches!(
                err,
                Error::UnknownName {
                    kind: "beta_schedule",
                    ..
                }
            ),
            "{kind}: {err}"
        );

        let mut c = sd15();
        c.prediction_type = Some("noise".into());
        let err = build_scheduler(kind, &c)
            .err()
            .expect("unknown prediction_type accepted");
        assert!(err.to_string().contains("prediction_type"), "{kind}: {err}");

        let mut c = sd15();
        c.timestep_spacing = Some("uniform".into());
        let err = build_scheduler(kind, &c)
            .err()
            .expect("unknown timestep_spacing accepted");
        assert!(
            err.to_string().contains("timestep_spacing"),
            "{kind}: {err}"
        );
    }
    let mut c = sd15();
    c.solver_type = Some("rk4".into());
    assert!(build_scheduler(SchedulerKind::DpmPlusPlus2M, &c).is_err());
    let mut c = sd15();
    c.algorithm_type = Some("sde-dpmsolver++".into());
    assert!(build_scheduler(SchedulerKind::DpmPlusPlus2M, &c).is_err());
    let mut c = sd15();
    c.variance_type = Some("learned_range".into());
    assert!(build_scheduler(SchedulerKind::Ddpm, &c).is_err());
    let mut c = sd15();
    c.thresholding = Some(true);
    let err = build_scheduler(SchedulerKind::Ddim, &c).err().unwrap();
    assert!(err.to_string().contains("thresholding"), "{err}");
    let mut c = sd15();
    c.trained_betas = Some(vec![0.01; 10]);
    assert!(build_scheduler(SchedulerKind::Euler, &c).is_err());
}

#[test]
fn bad_step_counts_are_errors() {
    for kind in SchedulerKind::ALL {
        let mut s = build_scheduler(kind, &sd15()).unwrap();
        assert!(s.set_timesteps(0).is_err(), "{kind}: 0 steps accepted");
        assert!(
            s.set_timesteps(1001).is_err(),
            "{kind}: 1001 steps accepted"
        );
        s.set_timesteps(1000).unwrap();
    }
}

#[test]
fn stochastic_step_without_noise_is_an_error() {
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    for kind in [SchedulerKind::Ddpm, SchedulerKind::EulerAncestral] {
        let mut s = build_scheduler(kind, &sd15()).unwrap();
        assert!(s.is_stochastic());
        s.set_timesteps(10).unwrap();
        let t = s.timesteps()[0];
        let x_in = s.scale_model_input(x.clone(), t).unwrap();
        let err = s.step(&x_in, t, &x, None).expect_err("step without noise");
        assert!(err.to_string().contains("noise"), "{kind}: {err}");
    }
}

#[test]
fn step_before_set_timesteps_and_shape_mismatch_are_errors() {
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros((1, 4, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    for kind in SchedulerKind::ALL {
        let mut s = build_scheduler(kind, &sd15()).unwrap();
        assert!(
            s.step(&x, 999.0, &x, Some(&x)).is_err(),
            "{kind}: step before set_timesteps"
        );
        s.set_timesteps(10).unwrap();
        let t = s.timesteps()[0];
        assert!(
            s.step(&y, t, &x, Some(&x)).is_err(),
            "{kind}: shape mismatch accepted"
        );
    }
}

#[test]
fn half_precision_inputs_step() {
    let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F16, &Device::Cpu).unwrap();
    for kind in SchedulerKind::ALL {
        let mut s = build_scheduler(kind, &sd15()).unwrap();
        s.set_timesteps(5).unwrap();
        for &t in s.timesteps().to_vec().iter() {
            let x_in = s.scale_model_input(x.clone(), t).unwrap();
            let out = s.step(&x_in, t, &x, Some(&x)).unwrap();
            assert_eq!(out.prev_sample.dtype(), candle_core::DType::F16, "{kind}");
        }
    }
}

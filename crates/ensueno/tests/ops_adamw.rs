//! The fused AdamW of `ensueno::ops::adamw` against candle_nn's AdamW (same
//! formula as `torch.optim.AdamW`), over several steps, and its state
//! save/restore.
//!
//! Tolerance: max|ours - reference| / max(max|reference|, 1e-6) <= 1e-4 per
//! parameter tensor after every step.

mod common;
use common::rel_err;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use ensueno::ops::adamw::AdamW;

fn config() -> ParamsAdamW {
    ParamsAdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.05,
    }
}

fn init(shapes: &[&[usize]], dtype: DType) -> Vec<Tensor> {
    shapes
        .iter()
        .map(|s| {
            Tensor::randn(0f32, 1., *s, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        })
        .collect()
}

/// A loss whose gradient changes from step to step.
fn loss(vars: &[Var], step: usize) -> Tensor {
    let mut total = Tensor::zeros((), vars[0].dtype(), &Device::Cpu).unwrap();
    for (i, v) in vars.iter().enumerate() {
        let t = v.as_tensor();
        let w = ((step + i) as f64 * 0.37).sin();
        let term = ((t.sqr().unwrap() * 0.5).unwrap() + (t * w).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        total = (total + term).unwrap();
    }
    total
}

fn compare_with_candle(dtype: DType) {
    let shapes: [&[usize]; 3] = [&[37, 5], &[1000], &[3, 70000]];
    let start = init(&shapes, dtype);
    let ours_vars: Vec<Var> = start.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ref_vars: Vec<Var> = start.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let mut ours = AdamW::new(ours_vars.clone(), config()).unwrap();
    let mut reference = candle_nn::AdamW::new(ref_vars.clone(), config()).unwrap();
    for step in 0..6 {
        ours.backward_step(&loss(&ours_vars, step)).unwrap();
        reference.backward_step(&loss(&ref_vars, step)).unwrap();
        for (i, (a, b)) in ours_vars.iter().zip(&ref_vars).enumerate() {
            let e = rel_err(a.as_tensor(), b.as_tensor());
            eprintln!("{dtype:?} step {step} param {i}: rel err {e:.3e}");
            assert!(e <= 1e-4, "step {step} param {i}: rel err {e}");
        }
    }
    assert_eq!(ours.step_count(), 6);
}

#[test]
fn adamw_matches_candle_nn_f32() {
    compare_with_candle(DType::F32);
}

#[test]
fn adamw_matches_candle_nn_f64_fallback() {
    compare_with_candle(DType::F64);
}

/// The tensor path (any dtype but f32 on the CPU, and every GPU) must keep
/// no autograd graph in its moments: a graph there links each step to the
/// last, and training ran out of GPU memory after about a hundred steps.
#[test]
fn adamw_fallback_moments_hold_no_graph() {
    let start = init(&[&[4, 3]], DType::F64);
    let var = Var::from_tensor(&start[0]).unwrap();
    let mut opt = AdamW::new(vec![var.clone()], config()).unwrap();
    for step in 0..3 {
        // A gradient that depends on the variable (x^2 terms), so that it
        // records ops.
        opt.backward_step(&loss(std::slice::from_ref(&var), step))
            .unwrap();
    }
    let state = opt.state().unwrap();
    for key in ["0.exp_avg", "0.exp_avg_sq"] {
        assert!(!state[key].track_op(), "{key} records an autograd graph");
    }
}

/// One scalar step against the PyTorch formula written out in f64.
#[test]
fn adamw_first_step_formula() {
    let p = Var::new(&[0.5f32], &Device::Cpu).unwrap();
    let c = config();
    let mut opt = AdamW::new(vec![p.clone()], c.clone()).unwrap();
    // loss = 3 p  -> grad 3
    opt.backward_step(&(p.as_tensor() * 3.0).unwrap().sum_all().unwrap())
        .unwrap();
    let (g, p0) = (3.0f64, 0.5f64);
    let m = (1.0 - c.beta1) * g;
    let v = (1.0 - c.beta2) * g * g;
    let bc1 = 1.0 - c.beta1;
    let bc2 = 1.0 - c.beta2;
    let expected =
        p0 * (1.0 - c.lr * c.weight_decay) - c.lr / bc1 * m / (v.sqrt() / bc2.sqrt() + c.eps);
    let got = p.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
    assert!((got - expected).abs() <= 1e-6, "{got} vs {expected}");
}

#[test]
fn adamw_state_round_trip() {
    let shapes: [&[usize]; 2] = [&[4, 9], &[300]];
    let start = init(&shapes, DType::F32);
    let a: Vec<Var> = start.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let mut opt_a = AdamW::new(a.clone(), config()).unwrap();
    for step in 0..3 {
        opt_a.backward_step(&loss(&a, step)).unwrap();
    }
    // Resume from a checkpoint of the parameters and the optimiser state.
    let state: HashMap<String, Tensor> = opt_a.state().unwrap();
    assert!(state.contains_key("0.exp_avg") && state.contains_key("1.exp_avg_sq"));
    let b: Vec<Var> = a
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
        .collect();
    let mut opt_b = AdamW::new(b.clone(), config()).unwrap();
    opt_b.load_state(&state).unwrap();
    assert_eq!(opt_b.step_count(), 3);
    for step in 3..5 {
        opt_a.backward_step(&loss(&a, step)).unwrap();
        opt_b.backward_step(&loss(&b, step)).unwrap();
    }
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(rel_err(x.as_tensor(), y.as_tensor()), 0.0);
    }

    // A state for other parameters is refused without touching the optimiser.
    let mut bad = state.clone();
    bad.insert(
        "1.exp_avg".into(),
        Tensor::zeros(299, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(opt_b.load_state(&bad).is_err());
    let mut missing = state;
    missing.remove("step");
    assert!(opt_b.load_state(&missing).is_err());
    assert_eq!(opt_b.step_count(), 5);
}

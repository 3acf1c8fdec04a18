//! Helpers shared by the golden tests.
// Each test binary uses a different subset of these.
#![allow(dead_code)]

use candle_core::{Device, Tensor};

/// The device the golden tests run their models on: the CPU, or the first
/// GPU when `ENSUENO_TEST_DEVICE=cuda` (a build with `--features cuda`), so
/// that the same reference values check the CUDA path. An unknown value or
/// a GPU that does not answer fails the test rather than falling back.
pub fn device() -> Device {
    match std::env::var("ENSUENO_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).expect("ENSUENO_TEST_DEVICE=cuda but no GPU answers"),
        Ok(other) => panic!("ENSUENO_TEST_DEVICE must be cpu or cuda, got {other}"),
    }
}

/// The tolerance measure of the golden tests: the largest absolute
/// difference, relative to the largest magnitude of the reference,
/// `max|ours - ref| / max(max|ref|, 1e-6)`, over the whole tensor.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let f32 = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    };
    let (ours, reference) = (f32(ours), f32(reference));
    max_abs(&(&ours - &reference).unwrap()) / max_abs(&reference).max(1e-6)
}

/// The largest absolute value of a tensor (as f32).
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The tolerance of every comparison with a reference: relative error 1e-4.
pub const TOL: f32 = 1e-4;

/// Asserts `rel_err(ours, reference) <= TOL`, naming `what` on failure.
pub fn check(what: &str, ours: &Tensor, reference: &Tensor) {
    let e = rel_err(ours, reference);
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
}

/// The gradients of `(out * r).sum_all()`: every op test's scalar loss, with
/// `r` a fixed random tensor of `out`'s shape.
pub fn weighted_grads(out: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    (out * r).unwrap().sum_all().unwrap().backward().unwrap()
}

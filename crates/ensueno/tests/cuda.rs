//! The golden tests of the models and the Stable Diffusion pipeline, run on
//! the GPU: the same test files and the same reference values (diffusers /
//! transformers through `scripts/golden/`) as on the CPU, with every model
//! and input on CUDA device 0.
//!
//! Built only with `--features cuda` (one binary, so that it can be carried
//! to a GPU machine without a Rust toolchain):
//!
//! ```text
//! ENSUENO_TEST_DEVICE=cuda cargo test --release -p ensueno --features cuda --test cuda
//! ```
//!
//! `ENSUENO_TEST_DEVICE=cuda` is what moves the tests to the GPU
//! (`common::device()`); without it `runs_on_the_gpu` fails, so that this
//! binary never passes by checking the CPU instead.

mod common;

#[test]
fn runs_on_the_gpu() {
    assert_eq!(
        std::env::var("ENSUENO_TEST_DEVICE").as_deref(),
        Ok("cuda"),
        "run this binary with ENSUENO_TEST_DEVICE=cuda"
    );
    assert!(common::device().is_cuda());
}

#[path = "autoencoder_kl.rs"]
mod autoencoder_kl;
#[path = "autoencoder_tiny.rs"]
mod autoencoder_tiny;
#[path = "bert.rs"]
mod bert;
#[path = "clip_text_model.rs"]
mod clip_text_model;
#[path = "pipeline.rs"]
mod pipeline;
#[path = "unet_2d.rs"]
mod unet_2d;
#[path = "unet_2d_condition.rs"]
mod unet_2d_condition;

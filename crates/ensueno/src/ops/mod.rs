//! Fast CPU kernels as candle custom ops, with forward and backward passes.
//!
//! candle's own CPU convolution, normalisation and attention are general but
//! slow; these kernels take the hot paths of diffusion models (f32,
//! contiguous, on the CPU) and fall back to candle's composite ops everywhere
//! else (CUDA, f16/bf16), so models can call them unconditionally.

pub mod adamw;
pub mod attention;
pub mod bias;
pub mod conv;
pub mod group_norm;

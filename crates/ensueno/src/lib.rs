//! ensueno: text-to-image generative models on [candle](https://github.com/huggingface/candle).
//!
//! The crate follows the layout of diffusers: `models` only compute,
//! `schedulers` implement the sampling algorithms behind one trait,
//! `pipelines` compose them, and `io` reads and writes checkpoints, images and
//! arrays. Binaries (the `ensueno` CLI, the server) are thin glue over it.

pub mod data;
pub mod error;
pub mod eval;
pub mod io;
pub mod models;
pub mod ops;
pub mod pipelines;
pub mod schedulers;
pub mod train;
pub mod utils;

pub use error::{Error, Result};

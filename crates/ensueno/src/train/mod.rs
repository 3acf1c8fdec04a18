//! Training from scratch: a generic epoch loop with seeded data order,
//! checkpoints that survive a kill, exact resume, loss curves and a NaN
//! guard ([`runner`]), and the model-specific recipes behind [`TrainTask`]
//! (pixel-space diffusion, the Keras-example VAE, DCGAN, the classifier).
//!
//! Determinism: every random draw of a step comes from [`StepContext::rng`],
//! keyed by (seed, global step, stream); batches come from the data loader
//! keyed by (seed, epoch). A run resumed from the checkpoint of epoch `e`
//! therefore replays exactly the steps an uninterrupted run takes after `e`.

pub mod checkpoint;
pub mod classifier;
pub mod clip;
pub mod diffusion;
pub mod ema;
pub mod forward_process;
pub mod gan;
pub mod params;
pub mod runner;
pub mod text2image;
pub mod vae;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::utils::NoiseGenerator;
use crate::Result;

pub use checkpoint::{resolve_trained_model, Checkpoint};
pub use ema::Ema;
pub use params::ParamStore;
pub use runner::{train, TrainEvent, TrainSummary};

/// Settings shared by every trainer (the CLI's `--output`, `--epochs`,
/// `--batch-size`, `--lr`, `--seed`, `--resume`).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Checkpoints, curves and plots go here.
    pub output: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    /// Learning rate (the recipe's default when the user gives none).
    pub lr: f64,
    pub seed: u64,
    /// Continue from `output`'s latest checkpoint.
    pub resume: bool,
    /// Stop each epoch after this many batches (quick runs and tests).
    pub max_steps_per_epoch: Option<usize>,
    /// Checkpoints kept on disk (older ones are deleted), at least 1.
    pub keep_checkpoints: usize,
    /// Random horizontal flips of training images.
    pub hflip: bool,
}

impl TrainOptions {
    pub fn new(output: impl Into<PathBuf>) -> Self {
        Self {
            output: output.into(),
            epochs: 1,
            batch_size: 128,
            lr: 1e-3,
            seed: 0,
            resume: false,
            max_steps_per_epoch: None,
            keep_checkpoints: 2,
            hflip: false,
        }
    }
}

/// One batch of training data.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, C, H, W) f32 in [0, 1].
    pub images: Tensor,
    /// (B,) u32 class labels, when the dataset has them.
    pub labels: Option<Tensor>,
    /// One caption per image, when the dataset has them.
    pub captions: Option<Vec<String>>,
    /// Dataset indices of the images.
    pub indices: Vec<usize>,
}

/// Where a training step is: the source of all its randomness.
#[derive(Debug, Clone, Copy)]
pub struct StepContext {
    /// 0-based epoch.
    pub epoch: usize,
    /// 0-based global step (batches seen before this one).
    pub step: usize,
    pub seed: u64,
}

impl StepContext {
    /// A generator for this step; `stream` separates independent draws
    /// (noise, timesteps, dropout...) within the step.
    pub fn rng(&self, stream: u64) -> NoiseGenerator {
        NoiseGenerator::new(self.stream_seed(stream))
    }

    /// A uniform generator for this step and `stream` (integers, coin flips).
    pub fn uniform_rng(&self, stream: u64) -> rand_chacha::ChaCha8Rng {
        rand::SeedableRng::seed_from_u64(self.stream_seed(stream))
    }

    fn stream_seed(&self, stream: u64) -> u64 {
        params::mix64(self.seed ^ params::mix64(self.step as u64 ^ (stream << 48)))
    }
}

/// What `end_of_epoch` gets.
#[derive(Debug, Clone, Copy)]
pub struct EpochContext<'a> {
    /// 0-based epoch that just ended.
    pub epoch: usize,
    /// Total epochs of the run.
    pub epochs: usize,
    pub output: &'a Path,
    pub seed: u64,
}

impl EpochContext<'_> {
    pub fn is_last(&self) -> bool {
        self.epoch + 1 == self.epochs
    }
}

/// A model and its training recipe, driven by [`runner::train`].
pub trait TrainTask {
    /// The model kind, stored in checkpoints (`"diffusion"`, `"vae"`, ...).
    fn kind(&self) -> &str;
    /// Names of the numbers [`TrainTask::train_step`] returns (the first is
    /// the one a progress bar shows).
    fn loss_names(&self) -> Vec<String>;
    /// Everything that must be equal to resume a run: the model config and
    /// the recipe's settings. Compared as JSON on `--resume`.
    fn config(&self) -> serde_json::Value;
    /// One optimisation step on `batch`; returns the losses (all must be
    /// finite, or the run stops with the last good checkpoint kept).
    fn train_step(&mut self, batch: &Batch, ctx: &StepContext) -> Result<Vec<f64>>;
    /// After each epoch (sample grids, plots); the default does nothing.
    fn end_of_epoch(&mut self, _ctx: &EpochContext) -> Result<()> {
        Ok(())
    }
    /// Writes the model files (what `ensueno sample --model` loads) into
    /// `dir`, which exists and is empty.
    fn save_model(&self, dir: &Path) -> Result<()>;
    /// Every tensor needed to resume exactly: weights, optimiser moments,
    /// EMA weights..., by unique name.
    fn training_state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores what [`TrainTask::training_state`] returned.
    fn load_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// Serialises a config for [`TrainTask::config`] and `config.json` files.
pub fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v)
        .map_err(|e| crate::Error::invalid(format!("cannot serialise a config: {e}")))
}

/// The usual [`TrainTask::config`]: the model's config and the recipe's.
pub fn model_and_recipe<M: serde::Serialize, R: serde::Serialize>(
    model_key: &str,
    model: &M,
    recipe: &R,
) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert(model_key.to_string(), to_json(model).unwrap_or_default());
    map.insert("recipe".to_string(), to_json(recipe).unwrap_or_default());
    serde_json::Value::Object(map)
}

/// Prefixes every name of an optimiser state (`{i}.exp_avg`, `step`...).
pub fn prefixed(prefix: &str, state: HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = state
        .into_iter()
        .map(|(k, t)| (format!("{prefix}{k}"), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The entries of `state` under `prefix`, with the prefix removed.
pub fn strip_prefix(prefix: &str, state: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    state
        .iter()
        .filter_map(|(k, t)| k.strip_prefix(prefix).map(|s| (s.to_string(), t.clone())))
        .collect()
}

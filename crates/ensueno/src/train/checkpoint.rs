//! Checkpoints that a kill cannot corrupt, and finding a trained model.
//!
//! Layout of a training output folder:
//! ```text
//! OUTPUT/
//!   model/                      the latest weights, loadable by `ensueno sample`
//!   checkpoints/
//!     latest                    names the newest complete checkpoint
//!     epoch-0003/               the model files + training_state.{json,safetensors}
//!   loss.csv, loss_epochs.csv, loss.png, samples/ ...
//! ```
//! A checkpoint is written into a hidden temporary folder and renamed into
//! place; only then is `latest` replaced (itself by an atomic rename). A
//! process killed at any point leaves the previous checkpoint complete and
//! `latest` naming it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainTask;
use crate::io::atomic::write_atomic;
use crate::{Error, Result};

pub const STATE_JSON: &str = "training_state.json";
pub const STATE_TENSORS: &str = "training_state.safetensors";
const LATEST: &str = "latest";

/// Losses of one step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub epoch: usize,
    pub step: usize,
    pub losses: Vec<f64>,
}

/// `training_state.json`: where the run is and how it was configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingState {
    /// The [`TrainTask::kind`].
    pub kind: String,
    /// Epochs completed.
    pub epoch: usize,
    /// Steps completed.
    pub step: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub lr: f64,
    /// The [`TrainTask::config`], compared on resume.
    pub config: serde_json::Value,
    pub loss_names: Vec<String>,
    /// Per-step losses so far (rewritten into `loss.csv` on resume).
    pub history: Vec<StepRecord>,
    /// Seconds each completed epoch took.
    pub epoch_seconds: Vec<f64>,
    pub ensueno_version: String,
}

/// A complete checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainingState,
}

impl Checkpoint {
    /// The tensors of `training_state.safetensors`.
    pub fn tensors(&self) -> Result<HashMap<String, candle_core::Tensor>> {
        crate::io::weights::load_safetensors(
            &self.dir.join(STATE_TENSORS),
            &candle_core::Device::Cpu,
        )
    }
}

fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Writes the model files of `task` into `dir` through a temporary sibling
/// folder, then swaps it in (the old `dir`, if any, is removed afterwards).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(parent)
        .map_err(io_err(parent))?;
    fill(tmp.path())?;
    // Flush the folder's entries before it becomes visible under its name.
    if let Ok(f) = std::fs::File::open(tmp.path()) {
        let _ = f.sync_all();
    }
    let tmp = tmp.keep();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755));
    }
    let old = if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
        Some(old)
    } else {
        None
    };
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// Saves a checkpoint of `task` after `state.epoch` epochs, points
/// `latest` at it and keeps the newest `keep` checkpoints.
pub fn save(
    output: &Path,
    task: &dyn TrainTask,
    state: &TrainingState,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(output);
    let name = format!("epoch-{:04}", state.epoch);
    let dir = root.join(&name);
    write_dir_atomic(&dir, |tmp| {
        task.save_model(tmp)?;
        let tensors = task.training_state()?;
        crate::io::weights::save_safetensors(&tmp.join(STATE_TENSORS), &tensors, None)?;
        let json = serde_json::to_vec(state)
            .map_err(|e| Error::invalid(format!("cannot serialise the training state: {e}")))?;
        let path = tmp.join(STATE_JSON);
        write_atomic(&path, |w| {
            w.write_all(&json).map_err(|e| Error::io(&path, e))
        })
    })?;
    let latest = root.join(LATEST);
    write_atomic(&latest, |w| {
        w.write_all(name.as_bytes())
            .map_err(|e| Error::io(&latest, e))
    })?;
    prune(&root, keep.max(1))?;
    Ok(dir)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("epoch-"))
        .collect();
    names.sort();
    let n = names.len();
    for old in names.into_iter().take(n.saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(root.join(old));
    }
    Ok(())
}

/// The newest complete checkpoint in `output`, if any.
pub fn latest(output: &Path) -> Result<Option<Checkpoint>> {
    let root = checkpoints_dir(output);
    let pointer = root.join(LATEST);
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(io_err(&pointer))?;
    let dir = root.join(name.trim());
    let json_path = dir.join(STATE_JSON);
    let bytes = std::fs::read(&json_path).map_err(io_err(&json_path))?;
    let state: TrainingState = serde_json::from_slice(&bytes).map_err(|e| Error::Config {
        path: json_path.clone(),
        message: format!("not a training state: {e}"),
    })?;
    Ok(Some(Checkpoint { dir, state }))
}

/// Where the model of `dir` is: `dir` itself when it holds model files
/// (`model_index.json` or `config.json`), else `dir/model`, else the newest
/// checkpoint of a training output folder.
pub fn resolve_trained_model(dir: &Path) -> Result<PathBuf> {
    let is_model =
        |d: &Path| d.join("model_index.json").is_file() || d.join("config.json").is_file();
    if is_model(dir) {
        return Ok(dir.to_path_buf());
    }
    if is_model(&dir.join("model")) {
        return Ok(dir.join("model"));
    }
    if let Some(ck) = latest(dir)? {
        return Ok(ck.dir);
    }
    if !dir.exists() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
        ));
    }
    Err(Error::invalid(format!(
        "{} holds no model: expected model_index.json or config.json, a model/ folder, or checkpoints/ of a training run",
        dir.display()
    )))
}

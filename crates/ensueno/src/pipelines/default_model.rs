//! Where ensueno's own text-to-image model is found when no `--model` is
//! given: the model ships in the repository (`models/emoji-text2image`), so
//! `ensueno generate PROMPT` works right after a clone with no download.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The shipped model's folder name under `models/`.
pub const DEFAULT_MODEL_NAME: &str = "emoji-text2image";

/// The folders searched, in order: `$ENSUENO_HOME/models/<name>`, then
/// `models/<name>` beside the executable's install prefix (`bin/../models`
/// and a cargo `target/<profile>/` build's repository root), then the
/// repository the binary was built from.
pub fn default_model_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(home) = std::env::var_os("ENSUENO_HOME") {
        out.push(PathBuf::from(home).join("models").join(DEFAULT_MODEL_NAME));
    }
    if let Ok(exe) = std::env::current_exe() {
        // bin/ensueno -> ../models; target/release/ensueno -> ../../models.
        for up in 1..=3 {
            if let Some(root) = exe.ancestors().nth(up) {
                out.push(root.join("models").join(DEFAULT_MODEL_NAME));
            }
        }
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    out.push(built_from.join("models").join(DEFAULT_MODEL_NAME));
    out
}

/// The shipped model's folder, or an error naming every place looked at and
/// the flag that fixes it.
pub fn default_model_dir() -> Result<PathBuf> {
    let candidates = default_model_candidates();
    for c in &candidates {
        if c.join("model_index.json").is_file() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    Err(Error::invalid(format!(
        "ensueno's default model ({DEFAULT_MODEL_NAME}) was not found; looked in: {}. \
         Pass --model with a diffusers folder or a Hugging Face repo id, or set ENSUENO_HOME \
         to a folder that holds models/{DEFAULT_MODEL_NAME}",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

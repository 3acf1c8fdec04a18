//! Resolving `--model`: a local diffusers folder, or a Hugging Face hub repo id
//! fetched into (or found in) the standard hub cache.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The files of a Stable Diffusion repo that ensueno reads. Weights are tried
/// in order (full precision first, then the fp16 variant); optional files may
/// be absent.
const FILES: &[(&str, &[&str], bool)] = &[
    ("model_index.json", &[], true),
    ("scheduler/scheduler_config.json", &[], true),
    ("text_encoder/config.json", &[], true),
    (
        "text_encoder/model.safetensors",
        &["text_encoder/model.fp16.safetensors"],
        true,
    ),
    ("tokenizer/vocab.json", &[], true),
    ("tokenizer/merges.txt", &[], true),
    ("tokenizer/special_tokens_map.json", &[], false),
    ("tokenizer/tokenizer_config.json", &[], false),
    ("unet/config.json", &[], true),
    (
        "unet/diffusion_pytorch_model.safetensors",
        &["unet/diffusion_pytorch_model.fp16.safetensors"],
        true,
    ),
    ("vae/config.json", &[], true),
    (
        "vae/diffusion_pytorch_model.safetensors",
        &["vae/diffusion_pytorch_model.fp16.safetensors"],
        true,
    ),
];

/// Whether `spec` looks like a hub repo id (`owner/name`) rather than a path.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Turns a `--model` value into a local folder: an existing path as it is, a
/// repo id through the hub cache (downloading what is missing when online).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(spec) {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: "no such folder (and not a Hugging Face repo id of the form owner/name)"
                .into(),
        });
    }
    fetch_repo(spec)
}

#[cfg_attr(not(feature = "hub"), allow(dead_code))]
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
        .unwrap_or(false)
}

fn hint(repo: &str) -> String {
    format!(
        "download it where you have network (e.g. `huggingface-cli download {repo}`) or pass --model /path/to/a/diffusers/folder"
    )
}

#[cfg(feature = "hub")]
fn fetch_repo(repo: &str) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo};

    let cache = Cache::from_env();
    let cached = cache.repo(Repo::model(repo.to_string()));
    let from_cache = |name: &str, alts: &[&str]| -> Option<PathBuf> {
        std::iter::once(&name)
            .chain(alts.iter())
            .find_map(|n| cached.get(n))
    };
    if let Some(root) = all_files(|n, a| Ok(from_cache(n, a)))? {
        return Ok(root);
    }
    if offline() {
        return Err(Error::Hub(format!(
            "model '{repo}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {}",
            hint(repo)
        )));
    }
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub(format!("cannot use the Hugging Face hub: {e}")))?;
    let remote = api.model(repo.to_string());
    let root = all_files(|name, alts| {
        if let Some(p) = from_cache(name, alts) {
            return Ok(Some(p));
        }
        let mut last_err = None;
        for n in std::iter::once(&name).chain(alts.iter()) {
            match remote.get(n) {
                Ok(p) => return Ok(Some(p)),
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(hf_hub::api::sync::ApiError::RequestError(e)) if !is_not_found(&e.to_string()) => {
                Err(Error::Hub(format!(
                    "could not download '{name}' of '{repo}' from the Hugging Face hub (offline?): {e}; {}",
                    hint(repo)
                )))
            }
            _ => Ok(None),
        }
    })?;
    root.ok_or_else(|| {
        Error::Hub(format!(
            "'{repo}' on the hub is not a complete diffusers Stable Diffusion repo"
        ))
    })
}

#[cfg(feature = "hub")]
fn is_not_found(message: &str) -> bool {
    message.contains("404") || message.contains("Not Found")
}

#[cfg(not(feature = "hub"))]
fn fetch_repo(repo: &str) -> Result<PathBuf> {
    Err(Error::Hub(format!(
        "'{repo}' is not a local folder and this build has no hub support (feature `hub`): {}",
        hint(repo)
    )))
}

/// Finds every file with `get`; returns the snapshot folder when all the
/// required ones are there, `None` when one is missing.
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
fn all_files(
    mut get: impl FnMut(&str, &[&str]) -> Result<Option<PathBuf>>,
) -> Result<Option<PathBuf>> {
    let mut root = None;
    for (name, alts, required) in FILES {
        match get(name, alts)? {
            Some(p) if *name == "model_index.json" => root = p.parent().map(Path::to_path_buf),
            Some(_) => {}
            None if *required => return Ok(None),
            None => {}
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        assert!(looks_like_repo_id("runwayml/stable-diffusion-v1-5"));
        assert!(looks_like_repo_id("stabilityai/stable-diffusion-2-1-base"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("a/b/c"));
    }

    #[test]
    fn offline_without_cache_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", dir.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let e = resolve_model("nobody-ensueno/no-such-model")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--model"), "{e}");
        let e = resolve_model("/definitely/not/here")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such folder"), "{e}");
    }
}

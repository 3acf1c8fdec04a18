//! A diffusers pipeline folder (`model_index.json` + one sub-folder per
//! component), as `save_pretrained` writes it and the hub serves it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Weight file names diffusers and transformers write, in order of preference.
const WEIGHT_NAMES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

/// The parsed `model_index.json`: the pipeline class and, for each component,
/// the library and class that implement it.
#[derive(Debug, Clone, Default)]
pub struct ModelIndex {
    pub class_name: Option<String>,
    pub components: BTreeMap<String, (String, String)>,
}

impl ModelIndex {
    fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let map = value
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let mut index = ModelIndex::default();
        for (key, v) in map {
            if key == "_class_name" {
                index.class_name = v.as_str().map(str::to_string);
            } else if !key.starts_with('_') {
                if let Some([lib, class]) = v.as_array().map(|a| a.as_slice()) {
                    if let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) {
                        index
                            .components
                            .insert(key.clone(), (lib.to_string(), class.to_string()));
                    }
                }
            }
        }
        Ok(index)
    }
}

/// A local diffusers pipeline folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    index: ModelIndex,
}

impl ModelFolder {
    /// Opens `root`, reads its `model_index.json` and checks that the
    /// `required` components have their folders.
    pub fn open(root: &Path, required: &[&str]) -> Result<Self> {
        let model_err = |message: String| Error::Model {
            path: root.to_path_buf(),
            message,
        };
        if !root.is_dir() {
            return Err(model_err("no such folder".into()));
        }
        let index_path = root.join("model_index.json");
        let text = std::fs::read_to_string(&index_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                model_err(
                    "not a diffusers model folder: model_index.json is missing (expected model_index.json, \
                     text_encoder/, tokenizer/, unet/, vae/ and scheduler/)"
                        .into(),
                )
            } else {
                Error::io(&index_path, e)
            }
        })?;
        let index = ModelIndex::parse(&index_path, &text)?;
        let folder = ModelFolder {
            root: root.to_path_buf(),
            index,
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|c| !folder.root.join(c).is_dir())
            .collect();
        if !missing.is_empty() {
            return Err(model_err(format!(
                "incomplete model folder: missing {}",
                missing
                    .iter()
                    .map(|m| format!("{m}/"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(folder)
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A short name for the model (the folder name; the repo name for hub snapshots).
    pub fn name(&self) -> String {
        let snapshot = self
            .root
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "snapshots");
        let base = if snapshot {
            self.root
                .parent()
                .and_then(Path::parent)
                .and_then(|p| p.file_name())
                .map(|n| {
                    n.to_string_lossy()
                        .trim_start_matches("models--")
                        .replace("--", "/")
                })
        } else {
            None
        };
        base.unwrap_or_else(|| {
            self.root
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| self.root.display().to_string())
        })
    }

    /// The parsed `model_index.json`.
    pub fn index(&self) -> &ModelIndex {
        &self.index
    }

    /// The class `model_index.json` names for `component`, if any.
    pub fn component_class(&self, component: &str) -> Option<&str> {
        self.index
            .components
            .get(component)
            .map(|(_, c)| c.as_str())
    }

    /// The folder of `component`.
    pub fn component_dir(&self, component: &str) -> Result<PathBuf> {
        let dir = self.root.join(component);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::Model {
                path: self.root.clone(),
                message: format!("missing the {component}/ folder"),
            })
        }
    }

    /// The path of a component's `config.json` (or `scheduler_config.json`).
    pub fn config_path(&self, component: &str) -> Result<PathBuf> {
        let dir = self.component_dir(component)?;
        ["config.json", "scheduler_config.json"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::Model {
                path: dir.clone(),
                message: "missing config.json".into(),
            })
    }

    /// Reads a component's `config.json` (or `scheduler_config.json`).
    pub fn read_config<T: DeserializeOwned>(&self, component: &str) -> Result<T> {
        read_json(&self.config_path(component)?)
    }

    /// The safetensors files holding a component's weights (one file, or the
    /// shards an `*.safetensors.index.json` lists).
    pub fn weight_files(&self, component: &str) -> Result<Vec<PathBuf>> {
        let dir = self.component_dir(component)?;
        component_weight_files(&dir)
    }

    /// Memory-maps a component's weights; tensors are converted to `dtype` as
    /// they are read. Headers are checked here, so a truncated or corrupt file
    /// fails now with its name rather than later inside a model.
    pub fn var_builder(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let files = self.weight_files(component)?;
        var_builder_from_files(&files, dtype, device)
    }
}

/// The safetensors weight files in a component folder.
pub fn component_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for name in WEIGHT_NAMES {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(vec![p]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            let value: serde_json::Value = read_json(&index)?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config {
                    path: index.clone(),
                    message: "no weight_map".into(),
                })?;
            let mut shards: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .filter(|s| !s.contains("..") && !s.contains('/'))
                .map(|s| dir.join(s))
                .collect();
            shards.sort();
            shards.dedup();
            return Ok(shards);
        }
    }
    let has_bin = dir.join("diffusion_pytorch_model.bin").is_file()
        || dir.join("pytorch_model.bin").is_file();
    Err(Error::Model {
        path: dir.to_path_buf(),
        message: if has_bin {
            "only PyTorch .bin weights found; ensueno reads safetensors (convert with diffusers' save_pretrained(safe_serialization=True))".into()
        } else {
            format!("no weights found (looked for {})", WEIGHT_NAMES.join(", "))
        },
    })
}

/// A [`VarBuilder`] over memory-mapped safetensors files, with the files'
/// headers validated first (see [`super::weights`] for how memory is kept low).
pub fn var_builder_from_files(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        super::weights::check_exists(f)?;
    }
    let weights = super::weights::SafetensorsWeights::open(files)?;
    Ok(VarBuilder::from_backend(
        Box::new(weights),
        dtype,
        device.clone(),
    ))
}

/// Reads and deserializes a JSON file.
/// Reads a `config.json` and runs its `validate`; a failed check becomes
/// [`Error::Config`] naming the file.
pub fn read_validated<T: DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let config: T = read_json(path)?;
    validate(&config).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(config)
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Adds the component path to errors raised while building a model from it,
/// e.g. "model unet: cannot find tensor down_blocks.0...".
pub fn in_component<T>(dir: &Path, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Candle(c) => Error::Model {
            path: dir.to_path_buf(),
            message: c.to_string(),
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_partial_folders_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = ModelFolder::open(dir.path(), &["unet"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_index.json is missing"), "{e}");
        std::fs::write(dir.path().join("model_index.json"), r#"{"_class_name":"StableDiffusionPipeline","unet":["diffusers","UNet2DConditionModel"]}"#).unwrap();
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        let e = ModelFolder::open(dir.path(), &["unet", "vae", "tokenizer"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing vae/, tokenizer/"), "{e}");
        let f = ModelFolder::open(dir.path(), &["unet"]).unwrap();
        assert_eq!(f.component_class("unet"), Some("UNet2DConditionModel"));
        let e = f.weight_files("unet").unwrap_err().to_string();
        assert!(e.contains("no weights found"), "{e}");
    }

    #[test]
    fn corrupt_and_truncated_safetensors_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("model.safetensors");
        let t = candle_core::Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("w".to_string(), t)]),
            &good,
        )
        .unwrap();
        assert!(
            var_builder_from_files(std::slice::from_ref(&good), DType::F32, &Device::Cpu).is_ok()
        );
        let bytes = std::fs::read(&good).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 8]).unwrap();
        let e = var_builder_from_files(&[cut], DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = var_builder_from_files(&[junk], DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
    }
}

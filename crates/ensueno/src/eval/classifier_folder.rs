//! Loading a scoring classifier: the shared MNIST classifier (a bare
//! safetensors file, MNIST input statistics) or one trained by
//! `ensueno train classifier` (a folder with `config.json` naming its
//! classes and input statistics).

use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::mnist_classifier::{MnistClassifier, MNIST_MEAN, MNIST_STD};
use crate::io::atomic::write_json;
use crate::Result;

pub const CLASSIFIER_WEIGHTS: &str = "model.safetensors";

/// `config.json` of a classifier folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    #[serde(rename = "_class_name", default = "d_class")]
    pub class_name: String,
    pub class_names: Vec<String>,
    /// Inputs are standardised as (x - input_mean) / input_std, x in [0, 1].
    pub input_mean: f64,
    pub input_std: f64,
}

fn d_class() -> String {
    "MnistClassifier".to_string()
}

impl ClassifierConfig {
    pub fn new(class_names: Vec<String>, input_mean: f64, input_std: f64) -> Self {
        Self {
            class_name: d_class(),
            class_names,
            input_mean,
            input_std,
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join("config.json"), self)
    }
}

/// A classifier and the names of its classes (digits for the bare shared
/// file).
pub fn load_classifier(path: &Path, device: &Device) -> Result<(MnistClassifier, Vec<String>)> {
    if path.is_dir() {
        let config: ClassifierConfig =
            crate::io::model_folder::read_json(&path.join("config.json"))?;
        let model = MnistClassifier::load(&path.join(CLASSIFIER_WEIGHTS), device)?
            .with_input_standardization(config.input_mean, config.input_std)?;
        Ok((model, config.class_names))
    } else {
        let model = MnistClassifier::load(path, device)?
            .with_input_standardization(MNIST_MEAN, MNIST_STD)?;
        Ok((model, (0..10).map(|d| d.to_string()).collect()))
    }
}

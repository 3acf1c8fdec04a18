//! Training the independent classifier used to score generated images
//! (`ensueno train classifier`): the architecture of the shared MNIST
//! classifier ([`MnistClassifier`]), trained with batch statistics, NLL loss
//! and Adam, for datasets that come without one (Fashion-MNIST).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW};

use super::{prefixed, strip_prefix, Batch, ParamStore, StepContext, TrainTask};
use crate::eval::mnist_classifier::MnistClassifier;
use crate::eval::ClassifierConfig;
use crate::ops::adamw::AdamW;
use crate::{Error, Result};

pub struct ClassifierTask {
    config: ClassifierConfig,
    params: ParamStore,
    model: MnistClassifier,
    opt: AdamW,
}

impl ClassifierTask {
    /// A fresh classifier; inputs are standardised with the dataset's
    /// pixel mean and standard deviation given in `config`.
    pub fn new(config: ClassifierConfig, lr: f64, seed: u64, device: &Device) -> Result<Self> {
        if config.class_names.len() != crate::eval::mnist_classifier::NUM_CLASSES {
            return Err(Error::invalid(format!(
                "the classifier has 10 outputs but the data has {} classes",
                config.class_names.len()
            )));
        }
        let params = ParamStore::new(seed);
        let model = MnistClassifier::new(params.var_builder(DType::F32, device))?
            .with_input_standardization(config.input_mean, config.input_std)?;
        let vars = params
            .vars()
            .into_iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, v)| v)
            .collect();
        let opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr,
                weight_decay: 0.,
                ..ParamsAdamW::default()
            },
        )?;
        Ok(Self {
            config,
            params,
            model,
            opt,
        })
    }

    pub fn model(&self) -> &MnistClassifier {
        &self.model
    }
}

impl TrainTask for ClassifierTask {
    fn kind(&self) -> &str {
        "classifier"
    }

    fn loss_names(&self) -> Vec<String> {
        vec!["loss".into(), "accuracy".into()]
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn train_step(&mut self, batch: &Batch, _ctx: &StepContext) -> Result<Vec<f64>> {
        let labels = batch
            .labels
            .as_ref()
            .ok_or_else(|| Error::invalid("training a classifier needs labelled data"))?;
        let log_probs = self.model.forward_train(&batch.images, true)?;
        let loss = candle_nn::loss::nll(&log_probs, labels)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let predicted: Vec<u32> = log_probs.argmax(1)?.to_vec1()?;
        let acc = crate::eval::accuracy(&predicted, &labels.to_vec1::<u32>()?);
        if value.is_finite() {
            self.opt.backward_step(&loss)?;
        }
        Ok(vec![value, acc])
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.config.save(dir)?;
        self.params
            .save_safetensors(&dir.join(crate::eval::CLASSIFIER_WEIGHTS), None)
    }

    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.params.state("model.");
        out.extend(prefixed("optimizer.", self.opt.state()?));
        Ok(out)
    }

    fn load_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.params.load_tensors(state, "model.")?;
        self.opt.load_state(&strip_prefix("optimizer.", state))
    }
}

//! Variational-autoencoder training (`ensueno train vae`): the Keras
//! "Variational AutoEncoder" example (keras.io/examples/generative/vae) on
//! [`ConvVAE`], with its plots of the latent space.
//!
//! Paper: Kingma & Welling, "Auto-Encoding Variational Bayes", 2013,
//! arXiv:1312.6114. Recipe of the Keras example: images / 255, Adam
//! (learning rate 1e-3), batch 128, loss = summed per-pixel binary
//! cross-entropy + KL divergence, averaged over the batch ([`vae_loss`]).
//! The PyTorch twin is `scripts/twins/vae.py`.
//!
//! Each epoch ends by writing, into the output folder, `latent_scatter.png`
//! (the test set's latent means coloured by class) and `manifold.png` (the
//! decoder over a 30 x 30 grid of the latent square `[-1, 1]^2`), the two
//! figures of the Keras example; both need a two-dimensional latent space.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::{
    prefixed, strip_prefix, Batch, EpochContext, ParamStore, StepContext, TrainOptions, TrainTask,
};
use crate::data::ImageDataset;
use crate::io::atomic::write_atomic;
use crate::models::conv_vae::{vae_loss, ConvVAE, ConvVAEConfig};
use crate::ops::adamw::AdamW;
use crate::{Error, Result};

/// Side of the Keras example's latent manifold grid.
pub const MANIFOLD_N: usize = 30;
/// Half-width of the latent square the manifold covers.
pub const MANIFOLD_SCALE: f64 = 1.0;

/// The recipe's settings (what must match to resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeRecipe {
    /// Not part of the resume identity here: the runner checks `--lr` itself.
    #[serde(skip)]
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// A [`ConvVAE`] and its Adam optimiser.
pub struct VaeTask {
    config: ConvVAEConfig,
    recipe: VaeRecipe,
    params: ParamStore,
    model: ConvVAE,
    opt: AdamW,
    test_set: Option<ImageDataset>,
    device: Device,
}

impl VaeTask {
    /// A freshly initialised model (weights seeded by `options.seed`);
    /// `test_set` feeds the latent scatter plot.
    pub fn new(
        config: ConvVAEConfig,
        options: &TrainOptions,
        test_set: Option<ImageDataset>,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(t) = &test_set {
            check_dataset(&config, t)?;
        }
        // Keras' layer defaults (Glorot-uniform kernels, zero biases), so the
        // recipe starts where the Keras example and the PyTorch twin start.
        let params = ParamStore::keras_defaults(options.seed);
        let model = ConvVAE::new(params.var_builder(DType::F32, device), &config)?;
        // Keras' Adam defaults (beta 0.9 / 0.999, epsilon 1e-7), no decay.
        let recipe = VaeRecipe {
            lr: options.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
        };
        let opt = params.adamw(ParamsAdamW {
            lr: recipe.lr,
            beta1: recipe.beta1,
            beta2: recipe.beta2,
            eps: recipe.eps,
            weight_decay: 0.0,
        })?;
        Ok(Self {
            config,
            recipe,
            params,
            model,
            opt,
            test_set,
            device: device.clone(),
        })
    }

    pub fn model(&self) -> &ConvVAE {
        &self.model
    }

    pub fn num_parameters(&self) -> usize {
        self.params.num_parameters()
    }

    /// The latent means of every image of `data`, in batches.
    pub fn encode_dataset(&self, data: &ImageDataset) -> Result<Vec<(f32, f32)>> {
        let mut points = Vec::with_capacity(data.len());
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(500) {
            let x = data.batch_images(chunk, &self.device)?;
            let (z_mean, _) = self.model.encode(&x)?;
            let z = z_mean.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            points.extend(z.iter().map(|r| (r[0], r[1])));
        }
        Ok(points)
    }

    /// The decoder over an `n x n` grid of `[-scale, scale]^2`: row `i`,
    /// column `j` decodes `z = (x_j, y_i)` with `x` increasing to the right
    /// and `y` decreasing downwards (the Keras example's layout).
    ///
    /// # Shapes
    /// Returns `[n * n, C, S, S]` in `[0, 1]`.
    pub fn manifold(&self, n: usize, scale: f64) -> Result<Tensor> {
        if self.config.latent_dim != 2 {
            return Err(Error::invalid(format!(
                "the latent manifold needs latent_dim 2, the model has {}",
                self.config.latent_dim
            )));
        }
        if n < 2 {
            return Err(Error::invalid("the latent manifold needs n >= 2"));
        }
        let at = |k: usize| (-scale + 2.0 * scale * k as f64 / (n - 1) as f64) as f32;
        let mut z = Vec::with_capacity(2 * n * n);
        for i in 0..n {
            for j in 0..n {
                z.push(at(j));
                z.push(at(n - 1 - i));
            }
        }
        let z = Tensor::from_vec(z, (n * n, 2), &self.device)?;
        self.model.decode(&z)
    }
}

fn check_dataset(config: &ConvVAEConfig, data: &ImageDataset) -> Result<()> {
    let s = config.sample_size;
    if data.channels != config.in_channels || data.height != s || data.width != s {
        return Err(Error::invalid(format!(
            "{}: images are {}x{}x{} but the VAE expects {}x{s}x{s} (channels x height x width)",
            data.name, data.channels, data.height, data.width, config.in_channels
        )));
    }
    Ok(())
}

impl TrainTask for VaeTask {
    fn kind(&self) -> &str {
        "vae"
    }

    fn loss_names(&self) -> Vec<String> {
        ["loss", "reconstruction_loss", "kl_loss"]
            .map(String::from)
            .to_vec()
    }

    fn config(&self) -> serde_json::Value {
        super::model_and_recipe("model", &self.config, &self.recipe)
    }

    fn train_step(&mut self, batch: &Batch, ctx: &StepContext) -> Result<Vec<f64>> {
        let x = &batch.images;
        let b = x.dim(0)?;
        let eps = ctx
            .rng(0)
            .randn((b, self.config.latent_dim), DType::F32, &self.device)?;
        let out = self.model.forward(x, &eps)?;
        let loss = vae_loss(x, &out)?;
        let values = [&loss.total, &loss.reconstruction, &loss.kl]
            .iter()
            .map(|t| Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?))
            .collect::<Result<Vec<f64>>>()?;
        if values.iter().all(|v| v.is_finite()) {
            let grads = loss.total.backward()?;
            self.opt.step(&grads)?;
        }
        // Non-finite: no update; the runner stops with the last good checkpoint.
        Ok(values)
    }

    fn end_of_epoch(&mut self, ctx: &EpochContext) -> Result<()> {
        if self.config.latent_dim != 2 {
            return Ok(());
        }
        if let Some(test) = &self.test_set {
            let points = self.encode_dataset(test)?;
            let classes: Vec<u32> = match &test.labels {
                Some(l) => l.clone(),
                None => vec![0; points.len()],
            };
            let names: Vec<String> = match (&test.class_names, test.num_classes()) {
                (Some(n), _) => n.clone(),
                (None, Some(k)) => (0..k).map(|c| c.to_string()).collect(),
                (None, None) => vec!["images".to_string()],
            };
            crate::io::plot::scatter_by_class(
                &ctx.output.join("latent_scatter.png"),
                &format!("latent means of {} (epoch {})", test.name, ctx.epoch + 1),
                &points,
                &classes,
                &names,
            )?;
        }
        let grid = self.manifold(MANIFOLD_N, MANIFOLD_SCALE)?;
        crate::io::plot::image_grid(&ctx.output.join("manifold.png"), &grid, MANIFOLD_N, 0, 1)
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        let path = dir.join("config.json");
        let text = self.config.to_json()?;
        write_atomic(&path, |w| {
            w.write_all(text.as_bytes())
                .map_err(|e| Error::io(&path, e))
        })?;
        self.params
            .save_safetensors(&dir.join("model.safetensors"), None)
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

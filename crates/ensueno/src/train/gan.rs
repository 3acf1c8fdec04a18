//! GAN training (`ensueno train gan`): a (class-conditional) DCGAN with the
//! non-saturating loss and one Adam optimiser per network.
//!
//! Papers: Goodfellow et al., "Generative Adversarial Nets", 2014,
//! arXiv:1406.2661 (non-saturating generator loss); Radford, Metz &
//! Chintala, 2015, arXiv:1511.06434 (architecture, N(0, 0.02) init,
//! Adam(2e-4, beta1 0.5)); Mirza & Osindero, 2014, arXiv:1411.1784 (class
//! conditioning). The PyTorch twin is `scripts/twins/gan.py`; one step is,
//! as there: generate a batch (random labels), update the discriminator on
//! real + detached fake images, then update the generator through the
//! updated discriminator. All forwards run BatchNorm in training mode.
//!
//! Each epoch ends with `samples/epoch-NNN.png`: images of a fixed noise
//! batch, one row per class.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::{
    prefixed, strip_prefix, Batch, EpochContext, ParamStore, StepContext, TrainOptions, TrainTask,
};
use crate::io::atomic::write_atomic;
use crate::models::dcgan::{
    discriminator_loss, generator_loss, DCGANConfig, DCGANDiscriminator, DCGANGenerator,
};
use crate::ops::adamw::AdamW;
use crate::utils::NoiseGenerator;
use crate::{Error, Result};

/// Images per row of the sample grid.
pub const SAMPLES_PER_ROW: usize = 8;
/// Rows of the sample grid of an unconditional model.
const UNCONDITIONAL_ROWS: usize = 8;

/// The recipe's settings (what must match to resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GanRecipe {
    /// Not part of the resume identity here: the runner checks `--lr` itself.
    #[serde(skip)]
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Standard deviation of the N(0, std) initial weights (BatchNorm
    /// scales: N(1, std); biases: 0).
    pub init_std: f64,
}

impl GanRecipe {
    /// DCGAN's settings with learning rate `lr` (2e-4 in the paper).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.5,
            beta2: 0.999,
            init_std: 0.02,
        }
    }
}

/// A DCGAN generator/discriminator pair and their optimisers.
pub struct GanTask {
    config: DCGANConfig,
    recipe: GanRecipe,
    /// Both networks, under `generator.` and `discriminator.`.
    params: ParamStore,
    generator: DCGANGenerator,
    discriminator: DCGANDiscriminator,
    opt_g: AdamW,
    opt_d: AdamW,
    fixed_noise: Tensor,
    fixed_labels: Option<Tensor>,
    device: Device,
}

const G: &str = "generator.";
const D: &str = "discriminator.";

fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// DCGAN's initialisation, drawn per tensor from a stream keyed by the seed
/// and the tensor's name (independent of construction order).
fn dcgan_init(params: &ParamStore, seed: u64, std: f64) -> Result<()> {
    for (name, var) in params.vars() {
        if is_running_stat(&name) {
            continue;
        }
        let n = var.elem_count();
        let leaf = name.rsplit('.').nth(1).unwrap_or("");
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let mean = if leaf.starts_with("bn") { 1.0 } else { 0.0 };
            let mut rng = ChaCha8Rng::seed_from_u64(super::params::stream_seed(seed, &name));
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    (mean + std * z) as f32
                })
                .collect()
        };
        let t = Tensor::from_vec(values, var.shape(), &Device::Cpu)?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

fn optimiser(params: &ParamStore, prefix: &str, recipe: &GanRecipe) -> Result<AdamW> {
    // BatchNorm running statistics are variables of the store (so that
    // checkpoints keep them) but are not trained.
    let vars: Vec<Var> = params
        .vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix) && !is_running_stat(k))
        .map(|(_, v)| v)
        .collect();
    Ok(AdamW::new(
        vars,
        ParamsAdamW {
            lr: recipe.lr,
            beta1: recipe.beta1,
            beta2: recipe.beta2,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?)
}

impl GanTask {
    /// Fresh networks (weights seeded by `options.seed`).
    pub fn new(config: DCGANConfig, options: &TrainOptions, device: &Device) -> Result<Self> {
        config.validate()?;
        let recipe = GanRecipe::new(options.lr);
        let params = ParamStore::new(options.seed);
        let vb = params.var_builder(DType::F32, device);
        let generator = DCGANGenerator::new(vb.pp("generator"), &config)?;
        let discriminator = DCGANDiscriminator::new(vb.pp("discriminator"), &config)?;
        dcgan_init(&params, options.seed, recipe.init_std)?;
        let opt_g = optimiser(&params, G, &recipe)?;
        let opt_d = optimiser(&params, D, &recipe)?;
        let rows = config.num_classes.unwrap_or(UNCONDITIONAL_ROWS);
        let n = rows * SAMPLES_PER_ROW;
        // A seed of its own: the grid shows the same noise every epoch.
        let fixed_noise = NoiseGenerator::new(super::params::mix64(options.seed ^ 0x05A3_D1E5))
            .randn((n, config.latent_dim), DType::F32, device)?;
        let fixed_labels = match config.num_classes {
            Some(k) => {
                let l: Vec<u32> = (0..k as u32)
                    .flat_map(|c| std::iter::repeat_n(c, SAMPLES_PER_ROW))
                    .collect();
                Some(Tensor::new(l, device)?)
            }
            None => None,
        };
        Ok(Self {
            config,
            recipe,
            params,
            generator,
            discriminator,
            opt_g,
            opt_d,
            fixed_noise,
            fixed_labels,
            device: device.clone(),
        })
    }

    pub fn generator(&self) -> &DCGANGenerator {
        &self.generator
    }

    pub fn discriminator(&self) -> &DCGANDiscriminator {
        &self.discriminator
    }

    /// Scalar parameters of (generator, discriminator), running statistics excluded.
    pub fn num_parameters(&self) -> (usize, usize) {
        let count = |prefix: &str| {
            self.params
                .vars()
                .iter()
                .filter(|(k, _)| k.starts_with(prefix) && !is_running_stat(k))
                .map(|(_, v)| v.elem_count())
                .sum()
        };
        (count(G), count(D))
    }

    /// The fixed-noise sample grid's images in `[0, 1]` (BatchNorm in eval mode).
    ///
    /// # Shapes
    /// Returns `[rows * SAMPLES_PER_ROW, channels, S, S]`.
    pub fn samples(&self) -> Result<Tensor> {
        let x = self
            .generator
            .forward(&self.fixed_noise, self.fixed_labels.as_ref(), false)?;
        Ok(((x + 1.0)? * 0.5)?.clamp(0f32, 1f32)?)
    }

    fn save_part(&self, dir: &Path, prefix: &str, class_name: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("config.json");
        let text = self.config.to_json(class_name)?;
        write_atomic(&path, |w| {
            w.write_all(text.as_bytes())
                .map_err(|e| Error::io(&path, e))
        })?;
        let tensors: Vec<(String, Tensor)> = self
            .params
            .tensors()
            .into_iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|s| (s.to_string(), t)))
            .collect();
        crate::io::weights::save_safetensors(&dir.join("model.safetensors"), &tensors, None)
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl TrainTask for GanTask {
    fn kind(&self) -> &str {
        "gan"
    }

    fn loss_names(&self) -> Vec<String> {
        ["d_loss", "g_loss", "d_real", "d_fake"]
            .map(String::from)
            .to_vec()
    }

    fn config(&self) -> serde_json::Value {
        super::model_and_recipe("model", &self.config, &self.recipe)
    }

    fn train_step(&mut self, batch: &Batch, ctx: &StepContext) -> Result<Vec<f64>> {
        let c = &self.config;
        let s = c.sample_size;
        if batch.images.dims()[1..] != [c.channels, s, s] {
            return Err(Error::invalid(format!(
                "the GAN expects {}x{s}x{s} images, the data has {:?}",
                c.channels,
                &batch.images.dims()[1..]
            )));
        }
        let real = batch.images.affine(2.0, -1.0)?;
        let b = real.dim(0)?;
        let (real_labels, fake_labels) = match c.num_classes {
            Some(k) => {
                let real_labels = batch.labels.clone().ok_or_else(|| {
                    Error::invalid("the GAN is class-conditional but the dataset has no labels")
                })?;
                let mut rng = ctx.uniform_rng(1);
                let fake: Vec<u32> = (0..b).map(|_| rng.random_range(0..k as u32)).collect();
                (Some(real_labels), Some(Tensor::new(fake, &self.device)?))
            }
            None => (None, None),
        };
        let z = ctx
            .rng(0)
            .randn((b, c.latent_dim), DType::F32, &self.device)?;
        let fake = self.generator.forward(&z, fake_labels.as_ref(), true)?;

        let real_logits = self
            .discriminator
            .forward(&real, real_labels.as_ref(), true)?;
        let fake_logits = self
            .discriminator
            .forward(&fake.detach(), fake_labels.as_ref(), true)?;
        let d_loss = discriminator_loss(&real_logits, &fake_logits)?;
        let d_value = scalar(&d_loss)?;
        let d_real = scalar(&candle_nn::ops::sigmoid(&real_logits)?.mean_all()?)?;
        if !d_value.is_finite() {
            return Ok(vec![d_value, f64::NAN, d_real, f64::NAN]);
        }
        self.opt_d.step(&d_loss.backward()?)?;

        let fake_logits = self
            .discriminator
            .forward(&fake, fake_labels.as_ref(), true)?;
        let g_loss = generator_loss(&fake_logits)?;
        let g_value = scalar(&g_loss)?;
        let d_fake = scalar(&candle_nn::ops::sigmoid(&fake_logits)?.mean_all()?)?;
        if g_value.is_finite() {
            // The gradients reach the discriminator too; only opt_g uses them.
            self.opt_g.step(&g_loss.backward()?)?;
        }
        Ok(vec![d_value, g_value, d_real, d_fake])
    }

    fn end_of_epoch(&mut self, ctx: &EpochContext) -> Result<()> {
        let dir = ctx.output.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        crate::io::plot::image_grid(
            &dir.join(format!("epoch-{:03}.png", ctx.epoch + 1)),
            &self.samples()?,
            SAMPLES_PER_ROW,
            2,
            2,
        )
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.save_part(&dir.join("generator"), G, DCGANConfig::GENERATOR_CLASS_NAME)?;
        self.save_part(
            &dir.join("discriminator"),
            D,
            DCGANConfig::DISCRIMINATOR_CLASS_NAME,
        )
    }

    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.params.state("model.");
        out.extend(prefixed("optimizer_g.", self.opt_g.state()?));
        out.extend(prefixed("optimizer_d.", self.opt_d.state()?));
        Ok(out)
    }

    fn load_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.params.load_tensors(state, "model.")?;
        self.opt_g
            .load_state(&strip_prefix("optimizer_g.", state))?;
        self.opt_d.load_state(&strip_prefix("optimizer_d.", state))
    }
}

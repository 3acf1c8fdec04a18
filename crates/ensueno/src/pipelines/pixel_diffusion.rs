//! Sampling a pixel-space `UNet2DModel` (unconditional or class-conditional
//! with classifier-free guidance): what `ensueno sample` runs on the MNIST
//! diffusion models that `ensueno train diffusion` writes.
//!
//! DDPM: Ho, Jain, Abbeel 2020 (arXiv:2006.11239); classifier-free guidance:
//! Ho & Salimans 2022 (arXiv:2207.12598), with the unconditional branch as an
//! extra "null" class the model saw during training (label dropout).
//! Folder layout: diffusers' `DDPMPipeline` (`model_index.json`, `unet/`,
//! `scheduler/`), plus `sampling.json` with the class names and defaults.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::model_folder::{read_json, ModelFolder};
use crate::models::unet_2d::{UNet2DConfig, UNet2DModel};
use crate::schedulers::{build_scheduler, SchedulerConfig, SchedulerKind};
use crate::utils::NoiseGenerator;
use crate::{Error, Result};

pub const SAMPLING_JSON: &str = "sampling.json";

/// `sampling.json`: how the model was trained to be sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// Names of the classes (index = label); empty for unconditional models.
    #[serde(default)]
    pub class_names: Vec<String>,
    /// The label that stands for "no class" (classifier-free guidance), if
    /// the model was trained with label dropout.
    #[serde(default)]
    pub null_class: Option<u32>,
    #[serde(default = "d_guidance")]
    pub guidance_scale: f64,
    #[serde(default = "d_steps")]
    pub num_inference_steps: usize,
    #[serde(default = "d_scheduler")]
    pub scheduler: String,
}

fn d_guidance() -> f64 {
    2.0
}
fn d_steps() -> usize {
    20
}
fn d_scheduler() -> String {
    "ddim".to_string()
}

/// A loaded pixel-space diffusion model.
pub struct PixelDiffusionPipeline {
    pub unet: UNet2DModel,
    pub scheduler_config: SchedulerConfig,
    pub sampling: SamplingConfig,
    device: Device,
}

/// What to sample.
#[derive(Debug, Clone)]
pub struct PixelSampleRequest {
    /// One label per image (`None` for an unconditional model).
    pub classes: Option<Vec<u32>>,
    /// Number of images when `classes` is `None`.
    pub n: usize,
    pub seed: u64,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    /// Start from this noise (N, C, H, W) instead of seeded N(0, 1) draws
    /// (to reproduce another implementation's run exactly).
    pub initial_noise: Option<Tensor>,
}

impl PixelDiffusionPipeline {
    /// Assembles a pipeline from parts already in memory (training uses the
    /// EMA weights this way).
    pub fn new(
        unet: UNet2DModel,
        scheduler_config: SchedulerConfig,
        sampling: SamplingConfig,
        device: &Device,
    ) -> Self {
        Self {
            unet,
            scheduler_config,
            sampling,
            device: device.clone(),
        }
    }

    /// Loads a `DDPMPipeline`-layout folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let folder = ModelFolder::open(dir, &["unet", "scheduler"])?;
        let config: UNet2DConfig = folder.read_config("unet")?;
        let vb = folder.var_builder("unet", DType::F32, device)?;
        let unet = crate::io::model_folder::in_component(
            &folder.component_dir("unet")?,
            UNet2DModel::new(vb, &config),
        )?;
        let scheduler_config: SchedulerConfig = folder.read_config("scheduler")?;
        let sampling_path = dir.join(SAMPLING_JSON);
        let sampling = if sampling_path.is_file() {
            read_json(&sampling_path)?
        } else {
            SamplingConfig {
                class_names: Vec::new(),
                null_class: None,
                guidance_scale: d_guidance(),
                num_inference_steps: d_steps(),
                scheduler: d_scheduler(),
            }
        };
        Ok(Self::new(unet, scheduler_config, sampling, device))
    }

    /// Number of classes the model can be asked for (0: unconditional).
    pub fn num_classes(&self) -> usize {
        self.sampling.class_names.len()
    }

    /// Samples images, returned as (N, C, H, W) f32 in [0, 1].
    pub fn generate(
        &self,
        request: &PixelSampleRequest,
        on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let config = self.unet.config();
        let conditional = config.num_class_embeds.is_some();
        let (labels, n) = match (&request.classes, conditional) {
            (Some(c), true) => {
                let k = self.num_classes();
                if let Some(bad) = c.iter().find(|&&l| l as usize >= k) {
                    return Err(Error::invalid(format!(
                        "--class {bad} is out of range: this model knows {k} classes (0..={})",
                        k.saturating_sub(1)
                    )));
                }
                (Some(c.clone()), c.len())
            }
            (Some(_), false) => {
                return Err(Error::invalid(
                    "this model is unconditional: it takes no --class",
                ))
            }
            (None, true) => match self.sampling.null_class {
                Some(null) => (Some(vec![null; request.n]), request.n),
                None => {
                    return Err(Error::invalid(
                        "this model is class-conditional: pass --class N",
                    ))
                }
            },
            (None, false) => (None, request.n),
        };
        if n == 0 || n > 4096 {
            return Err(Error::invalid(format!(
                "the number of samples must be in 1..=4096, got {n}"
            )));
        }
        let steps = request.steps.unwrap_or(self.sampling.num_inference_steps);
        if steps == 0 || steps > 1000 {
            return Err(Error::invalid(format!(
                "steps must be in 1..=1000, got {steps}"
            )));
        }
        let guidance = request
            .guidance_scale
            .unwrap_or(self.sampling.guidance_scale);
        if !guidance.is_finite() || !(0.0..=50.0).contains(&guidance) {
            return Err(Error::invalid(format!(
                "guidance scale must be in [0, 50], got {guidance}"
            )));
        }
        let kind = match request.scheduler {
            Some(k) => k,
            None => self.sampling.scheduler.parse::<SchedulerKind>()?,
        };
        let mut scheduler = build_scheduler(kind, &self.scheduler_config)?;
        scheduler.set_timesteps(steps)?;

        let size = config.sample_hw().unwrap_or((28, 28));
        let shape = (n, config.in_channels, size.0, size.1);
        let mut rng = NoiseGenerator::new(request.seed);
        let noise = match &request.initial_noise {
            Some(t) if t.dims() == [shape.0, shape.1, shape.2, shape.3] => {
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            Some(t) => {
                return Err(Error::Shape {
                    what: "initial noise".to_string(),
                    expected: format!("{:?}", [shape.0, shape.1, shape.2, shape.3]),
                    got: format!("{:?}", t.dims()),
                })
            }
            None => rng.randn(shape, DType::F32, &self.device)?,
        };
        let mut x = (noise * scheduler.init_noise_sigma())?;
        let guided = guidance != 1.0 && labels.is_some() && self.sampling.null_class.is_some();
        let label_tensor = match &labels {
            Some(l) if guided => {
                let null = self.sampling.null_class.unwrap_or(0);
                let mut both = l.clone();
                both.extend(std::iter::repeat_n(null, n));
                Some(Tensor::new(both, &self.device)?)
            }
            Some(l) => Some(Tensor::new(l.as_slice(), &self.device)?),
            None => None,
        };
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(x.clone(), t)?;
            let input = if guided {
                Tensor::cat(&[&input, &input], 0)?
            } else {
                input
            };
            let tt = Tensor::new(&[t as f32], &self.device)?;
            let out = self.unet.forward(&input, &tt, label_tensor.as_ref())?;
            let out = if guided {
                let cond = out.narrow(0, 0, n)?;
                let uncond = out.narrow(0, n, n)?;
                (&uncond + ((cond - &uncond)? * guidance)?)?
            } else {
                out
            };
            let noise = if scheduler.is_stochastic() {
                Some(rng.randn(x.shape(), DType::F32, &self.device)?)
            } else {
                None
            };
            x = scheduler.step(&out, t, &x, noise.as_ref())?.prev_sample;
            on_step(i + 1, total)?;
        }
        Ok(((x.clamp(-1f32, 1f32)? + 1.)? * 0.5)?)
    }
}

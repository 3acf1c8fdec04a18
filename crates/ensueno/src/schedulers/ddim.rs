//! DDIM: denoising diffusion implicit models, the deterministic (eta = 0)
//! sampler.
//!
//! Paper: Song, Meng, Ermon, "Denoising Diffusion Implicit Models", 2020,
//! arXiv:2010.02502. Reference implementation: diffusers
//! `schedulers/scheduling_ddim.py` (`DDIMScheduler`, 0.42).

use candle_core::Tensor;

use super::betas::{self, NoiseSchedule, PredictionType, TimestepSpacing};
use super::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::{Error, Result};

/// The DDIM sampler with eta = 0 (no noise is added between steps).
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f64>,
    /// alphas_cumprod "before" the first training step: 1 when
    /// `set_alpha_to_one`, else alphas_cumprod[0].
    final_alpha_cumprod: f64,
    prediction_type: PredictionType,
    /// Clip range of the predicted x0, when `clip_sample` is on.
    clip_sample_range: Option<f64>,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
}

impl DDIMScheduler {
    /// Builds the scheduler; missing keys take DDIM's defaults (linear betas
    /// 0.0001..0.02, clip_sample true, set_alpha_to_one true, epsilon,
    /// "leading" spacing, steps_offset 0).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        betas::reject_thresholding(config, "DDIMScheduler")?;
        let schedule = NoiseSchedule::from_config(config, false)?;
        let num_train_timesteps = schedule.alphas_cumprod.len();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let clip_sample_range = if config.clip_sample.unwrap_or(true) {
            Some(config.clip_sample_range.unwrap_or(1.0))
        } else {
            None
        };
        Ok(Self {
            num_train_timesteps,
            final_alpha_cumprod,
            prediction_type: PredictionType::parse(
                config.prediction_type.as_deref().unwrap_or("epsilon"),
            )?,
            clip_sample_range,
            timestep_spacing: TimestepSpacing::parse(
                config.timestep_spacing.as_deref().unwrap_or("leading"),
            )?,
            steps_offset: config.steps_offset.unwrap_or(0),
            num_inference_steps: None,
            timesteps: (0..num_train_timesteps).rev().map(|t| t as f64).collect(),
            alphas_cumprod: schedule.alphas_cumprod,
        })
    }

    /// The cumulative alpha products of the training schedule (float32 values).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// alphas_cumprod at a training timestep, or the final value before t = 0.
    fn alpha_prod(&self, t: i64) -> Result<f64> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| Error::invalid(format!("timestep {t} is outside the training schedule")))
    }
}

impl Scheduler for DDIMScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        betas::check_num_inference_steps(num_inference_steps, self.num_train_timesteps)?;
        self.timesteps = betas::spaced_timesteps(
            self.timestep_spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
            true,
        );
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// DDIM has no step counter: a step is defined by its timestep alone.
    fn set_begin_index(&mut self, _begin_index: usize) {}

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<SchedulerOutput> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid("DDIMScheduler: call set_timesteps before step"))?;
        betas::check_shape("DDIM model_output", model_output, sample)?;
        let t = betas::train_index(timestep, self.num_train_timesteps)? as i64;
        // diffusers steps back by T / n whatever the spacing.
        let prev_t = t - (self.num_train_timesteps / n) as i64;
        let alpha_t = self.alpha_prod(t)?;
        let alpha_prev = self.alpha_prod(prev_t)?;
        let beta_t = 1.0 - alpha_t;

        let dtype = sample.dtype();
        let x = betas::upcast(sample)?;
        let m = model_output.to_dtype(x.dtype())?;
        let (mut x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                betas::lin2(
                    1.0 / alpha_t.sqrt(),
                    &x,
                    -beta_t.sqrt() / alpha_t.sqrt(),
                    &m,
                )?,
                m.clone(),
            ),
            PredictionType::Sample => (
                m.clone(),
                betas::lin2(1.0 / beta_t.sqrt(), &x, -alpha_t.sqrt() / beta_t.sqrt(), &m)?,
            ),
            PredictionType::VPrediction => (
                betas::lin2(alpha_t.sqrt(), &x, -beta_t.sqrt(), &m)?,
                betas::lin2(alpha_t.sqrt(), &m, beta_t.sqrt(), &x)?,
            ),
        };
        if let Some(r) = self.clip_sample_range {
            x0 = x0.clamp(-r, r)?;
        }
        // eta = 0: the variance term vanishes.
        let prev = betas::lin2(alpha_prev.sqrt(), &x0, (1.0 - alpha_prev).sqrt(), &eps)?;
        Ok(SchedulerOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        betas::check_shape("DDIM add_noise noise", noise, original)?;
        let t = betas::train_index(timestep, self.num_train_timesteps)?;
        let a = self.alphas_cumprod[t];
        betas::lin2(a.sqrt(), original, (1.0 - a).sqrt(), noise)
    }
}

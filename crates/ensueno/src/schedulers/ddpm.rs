//! DDPM: the ancestral sampler of denoising diffusion probabilistic models,
//! run on a subsequence of the training timesteps.
//!
//! Paper: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020,
//! arXiv:2006.11239. Reference implementation: diffusers
//! `schedulers/scheduling_ddpm.py` (`DDPMScheduler`, 0.42).

use candle_core::Tensor;

use super::betas::{self, NoiseSchedule, PredictionType, TimestepSpacing};
use super::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::{Error, Result};

/// The posterior variance used for the added noise (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarianceType {
    /// beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
    /// ("fixed_small" and "fixed_small_log", which take the same square root).
    FixedSmall,
    /// beta_t.
    FixedLarge,
}

/// The DDPM ancestral (stochastic) sampler.
#[derive(Debug, Clone)]
pub struct DDPMScheduler {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f64>,
    variance_type: VarianceType,
    prediction_type: PredictionType,
    clip_sample_range: Option<f64>,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    timesteps: Vec<f64>,
    ready: bool,
}

impl DDPMScheduler {
    /// Builds the scheduler; missing keys take DDPM's defaults (linear betas
    /// 0.0001..0.02, fixed_small variance, clip_sample true, epsilon,
    /// "leading" spacing). The learned variance types need a model that
    /// predicts its variance and are refused.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        betas::reject_thresholding(config, "DDPMScheduler")?;
        let variance_type = match config.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" | "fixed_small_log" => VarianceType::FixedSmall,
            "fixed_large" => VarianceType::FixedLarge,
            other @ ("fixed_large_log" | "learned" | "learned_range") => {
                return Err(Error::invalid(format!(
                    "DDPMScheduler: variance_type \"{other}\" is not supported (use fixed_small or fixed_large)"
                )))
            }
            other => {
                return Err(betas::unknown(
                    "variance_type",
                    other,
                    "fixed_small, fixed_small_log, fixed_large",
                ))
            }
        };
        let schedule = NoiseSchedule::from_config(config, false)?;
        let num_train_timesteps = schedule.alphas_cumprod.len();
        let clip_sample_range = if config.clip_sample.unwrap_or(true) {
            Some(config.clip_sample_range.unwrap_or(1.0))
        } else {
            None
        };
        Ok(Self {
            num_train_timesteps,
            variance_type,
            prediction_type: PredictionType::parse(
                config.prediction_type.as_deref().unwrap_or("epsilon"),
            )?,
            clip_sample_range,
            timestep_spacing: TimestepSpacing::parse(
                config.timestep_spacing.as_deref().unwrap_or("leading"),
            )?,
            steps_offset: config.steps_offset.unwrap_or(0),
            timesteps: (0..num_train_timesteps).rev().map(|t| t as f64).collect(),
            alphas_cumprod: schedule.alphas_cumprod,
            ready: false,
        })
    }

    /// The cumulative alpha products of the training schedule (float32 values).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The timestep after `t` in the schedule, -1 after the last.
    fn previous_timestep(&self, t: f64) -> Result<i64> {
        let i = self.timesteps.iter().position(|&x| x == t).ok_or_else(|| {
            Error::invalid(format!(
                "timestep {t} is not one of the scheduler's timesteps"
            ))
        })?;
        Ok(self.timesteps.get(i + 1).map_or(-1, |&p| p as i64))
    }
}

impl Scheduler for DDPMScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        betas::check_num_inference_steps(num_inference_steps, self.num_train_timesteps)?;
        self.timesteps = betas::spaced_timesteps(
            self.timestep_spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
            true,
        );
        self.ready = true;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// DDPM has no step counter: a step is defined by its timestep alone.
    fn set_begin_index(&mut self, _begin_index: usize) {}

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample)
    }

    /// `noise` is required at every step; it is not used at t = 0, where DDPM
    /// adds none.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<SchedulerOutput> {
        if !self.ready {
            return Err(Error::invalid(
                "DDPMScheduler: call set_timesteps before step",
            ));
        }
        let noise = noise
            .ok_or_else(|| Error::invalid("DDPMScheduler.step needs noise (it is stochastic)"))?;
        betas::check_shape("DDPM model_output", model_output, sample)?;
        betas::check_shape("DDPM noise", noise, sample)?;
        let t = betas::train_index(timestep, self.num_train_timesteps)?;
        let prev_t = self.previous_timestep(timestep)?;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = if prev_t >= 0 {
            *self
                .alphas_cumprod
                .get(prev_t as usize)
                .ok_or_else(|| Error::invalid("DDPM: timestep outside the training schedule"))?
        } else {
            1.0
        };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let dtype = sample.dtype();
        let x = betas::upcast(sample)?;
        let m = model_output.to_dtype(x.dtype())?;
        let mut x0 = match self.prediction_type {
            PredictionType::Epsilon => betas::lin2(
                1.0 / alpha_t.sqrt(),
                &x,
                -beta_t.sqrt() / alpha_t.sqrt(),
                &m,
            )?,
            PredictionType::Sample => m,
            PredictionType::VPrediction => betas::lin2(alpha_t.sqrt(), &x, -beta_t.sqrt(), &m)?,
        };
        if let Some(r) = self.clip_sample_range {
            x0 = x0.clamp(-r, r)?;
        }
        // Posterior mean (eq. 7 of the paper).
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_t;
        let x_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = betas::lin2(x0_coeff, &x0, x_coeff, &x)?;
        if t > 0 {
            let variance = match self.variance_type {
                VarianceType::FixedSmall => (beta_prev / beta_t * current_beta).max(1e-20),
                VarianceType::FixedLarge => current_beta,
            };
            let noise = noise.to_dtype(prev.dtype())?;
            prev = (prev + noise.affine(variance.sqrt(), 0.0)?)?;
        }
        Ok(SchedulerOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        betas::check_shape("DDPM add_noise noise", noise, original)?;
        let t = betas::train_index(timestep, self.num_train_timesteps)?;
        let a = self.alphas_cumprod[t];
        betas::lin2(a.sqrt(), original, (1.0 - a).sqrt(), noise)
    }

    fn is_stochastic(&self) -> bool {
        true
    }
}

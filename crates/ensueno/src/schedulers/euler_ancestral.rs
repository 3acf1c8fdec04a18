//! Euler ancestral sampler: an Euler step down to sigma_down followed by fresh
//! noise of size sigma_up (k-diffusion's `sample_euler_ancestral`, "Euler a").
//!
//! Paper: Karras, Aittala, Aila, Laine, "Elucidating the Design Space of
//! Diffusion-Based Generative Models", 2022, arXiv:2206.00364 (the ancestral
//! variant is Crowson's k-diffusion). Reference implementation: diffusers
//! `schedulers/scheduling_euler_ancestral_discrete.py`
//! (`EulerAncestralDiscreteScheduler`, 0.42). diffusers offers no Karras sigmas
//! here, so `use_karras_sigmas` is ignored as diffusers' `from_config` ignores it.

use candle_core::Tensor;

use super::betas::{self, NoiseSchedule, PredictionType, TimestepSpacing};
use super::euler_discrete::StepCounter;
use super::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::{Error, Result};

/// The Euler ancestral (stochastic) sampler.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f64>,
    /// Training sigmas, ascending in t (float32 values).
    train_sigmas: Vec<f64>,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    counter: StepCounter,
    ready: bool,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler; missing keys take its defaults (linear betas
    /// 0.0001..0.02, epsilon, "linspace" spacing). `prediction_type` "sample"
    /// is refused, as diffusers does.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, true)?;
        let train_sigmas = schedule.sigmas();
        let num_train_timesteps = train_sigmas.len();
        let prediction_type =
            PredictionType::parse(config.prediction_type.as_deref().unwrap_or("epsilon"))?;
        if prediction_type == PredictionType::Sample {
            return Err(Error::invalid(
                "EulerAncestralDiscreteScheduler does not support prediction_type \"sample\"",
            ));
        }
        if config.use_karras_sigmas == Some(true) {
            tracing::warn!(
                "EulerAncestralDiscreteScheduler has no Karras sigmas (as in diffusers); ignoring use_karras_sigmas"
            );
        }
        Ok(Self {
            num_train_timesteps,
            prediction_type,
            timestep_spacing: TimestepSpacing::parse(
                config.timestep_spacing.as_deref().unwrap_or("linspace"),
            )?,
            steps_offset: config.steps_offset.unwrap_or(0),
            timesteps: (0..num_train_timesteps).rev().map(|t| t as f64).collect(),
            sigmas: train_sigmas.iter().rev().copied().chain([0.0]).collect(),
            alphas_cumprod: schedule.alphas_cumprod,
            train_sigmas,
            counter: StepCounter::default(),
            ready: false,
        })
    }

    /// The cumulative alpha products of the training schedule (float32 values).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The sigmas of the current schedule: one per timestep plus a final zero.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        betas::check_num_inference_steps(num_inference_steps, self.num_train_timesteps)?;
        self.timesteps = betas::spaced_timesteps(
            self.timestep_spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
            false,
        );
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| betas::f32r(betas::interp(t, &self.train_sigmas)))
            .chain([0.0])
            .collect();
        self.counter.reset();
        self.ready = true;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.counter.begin_index = Some(begin_index);
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0, f64::max);
        match self.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => betas::f32r((max * max + 1.0).sqrt()),
        }
    }

    fn scale_model_input(&self, sample: Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.counter.current(&self.timesteps, timestep)?;
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid("Euler a: step index past the end of the schedule"))?;
        Ok(sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<SchedulerOutput> {
        if !self.ready {
            return Err(Error::invalid(
                "EulerAncestralDiscreteScheduler: call set_timesteps before step",
            ));
        }
        let noise = noise.ok_or_else(|| {
            Error::invalid("EulerAncestralDiscreteScheduler.step needs noise (it is stochastic)")
        })?;
        betas::check_shape("Euler a model_output", model_output, sample)?;
        betas::check_shape("Euler a noise", noise, sample)?;
        let i = self.counter.current(&self.timesteps, timestep)?;
        if i + 1 >= self.sigmas.len() {
            return Err(Error::invalid(
                "Euler a: step called after the last timestep",
            ));
        }
        let (sigma, sigma_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let dtype = model_output.dtype();
        let x = betas::upcast(sample)?;
        let m = model_output.to_dtype(x.dtype())?;
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => betas::lin2(1.0, &x, -sigma, &m)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                betas::lin2(-sigma / s2.sqrt(), &m, 1.0 / s2, &x)?
            }
            PredictionType::Sample => m,
        };
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let dt = (sigma_down as f32 - sigma as f32) as f64;
        let prev = betas::euler_update(&x, &x0, sigma, dt)?;
        let noise = noise.to_dtype(prev.dtype())?;
        let prev = (prev + noise.affine(sigma_up, 0.0)?)?;
        self.counter.step_index = Some(i + 1);
        Ok(SchedulerOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        betas::check_shape("Euler a add_noise noise", noise, original)?;
        let i = self.counter.for_add_noise(&self.timesteps, timestep)?;
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid("Euler a add_noise: begin_index past the schedule"))?;
        Ok((original + noise.affine(sigma, 0.0)?)?)
    }

    fn is_stochastic(&self) -> bool {
        true
    }
}

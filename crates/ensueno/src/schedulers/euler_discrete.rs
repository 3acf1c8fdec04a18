//! Euler sampler of the probability-flow ODE in sigma parameterisation
//! (Karras et al.'s Algorithm 2 without churn), optionally on Karras sigmas.
//!
//! Paper: Karras, Aittala, Aila, Laine, "Elucidating the Design Space of
//! Diffusion-Based Generative Models", 2022, arXiv:2206.00364. Reference
//! implementation: diffusers `schedulers/scheduling_euler_discrete.py`
//! (`EulerDiscreteScheduler`, 0.42).

use candle_core::Tensor;

use super::betas::{self, FinalSigmas, NoiseSchedule, PredictionType, TimestepSpacing};
use super::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::{Error, Result};

/// How sigmas between training timesteps are found (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interpolation {
    /// Linear in t between the training sigmas.
    Linear,
    /// Log-linear from the largest to the smallest training sigma, ignoring t.
    LogLinear,
}

/// Sigma-based step counter shared by the Euler schedulers: the index of the
/// current step, set from `begin_index` or by looking up the first timestep.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepCounter {
    pub step_index: Option<usize>,
    pub begin_index: Option<usize>,
}

impl StepCounter {
    /// The index the step at `timestep` runs at, without advancing.
    pub fn current(&self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        if let Some(i) = self.step_index {
            return Ok(i);
        }
        if let Some(b) = self.begin_index {
            return Ok(b);
        }
        betas::index_for_timestep(timesteps, timestep).ok_or_else(|| {
            Error::invalid(format!(
                "timestep {timestep} is not one of the scheduler's timesteps"
            ))
        })
    }

    /// The sigma index add_noise uses: the current step once stepping has
    /// begun, else `begin_index`, else the timestep's own index.
    pub fn for_add_noise(&self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        match (self.begin_index, self.step_index) {
            (None, _) => betas::index_for_timestep(timesteps, timestep).ok_or_else(|| {
                Error::invalid(format!(
                    "timestep {timestep} is not one of the scheduler's timesteps"
                ))
            }),
            (Some(_), Some(i)) => Ok(i),
            (Some(b), None) => Ok(b),
        }
    }

    pub fn reset(&mut self) {
        self.step_index = None;
        self.begin_index = None;
    }
}

/// The Euler (first-order, deterministic) sampler.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f64>,
    /// Training sigmas, ascending in t (float32 values).
    train_sigmas: Vec<f64>,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    interpolation: Interpolation,
    use_karras_sigmas: bool,
    final_sigmas: FinalSigmas,
    timesteps: Vec<f64>,
    /// One per timestep plus the final sigma.
    sigmas: Vec<f64>,
    counter: StepCounter,
    ready: bool,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler; missing keys take Euler's defaults (linear betas
    /// 0.0001..0.02, epsilon, "linspace" spacing, linear interpolation, no
    /// Karras sigmas, final sigma zero).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, true)?;
        let train_sigmas = schedule.sigmas();
        let num_train_timesteps = train_sigmas.len();
        let interpolation = match config.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => Interpolation::Linear,
            "log_linear" => Interpolation::LogLinear,
            other => {
                return Err(betas::unknown(
                    "interpolation_type",
                    other,
                    "linear, log_linear",
                ))
            }
        };
        Ok(Self {
            num_train_timesteps,
            prediction_type: PredictionType::parse(
                config.prediction_type.as_deref().unwrap_or("epsilon"),
            )?,
            timestep_spacing: TimestepSpacing::parse(
                config.timestep_spacing.as_deref().unwrap_or("linspace"),
            )?,
            steps_offset: config.steps_offset.unwrap_or(0),
            interpolation,
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
            final_sigmas: FinalSigmas::parse(
                config.final_sigmas_type.as_deref().unwrap_or("zero"),
            )?,
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

    /// The sigmas of the current schedule: one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        betas::check_num_inference_steps(n, self.num_train_timesteps)?;
        let mut timesteps = betas::spaced_timesteps(
            self.timestep_spacing,
            self.num_train_timesteps,
            n,
            self.steps_offset,
            false,
        );
        let mut sigmas: Vec<f64> = match self.interpolation {
            Interpolation::Linear => timesteps
                .iter()
                .map(|&t| betas::interp(t, &self.train_sigmas))
                .collect(),
            Interpolation::LogLinear => {
                let lo = (self.train_sigmas[0] as f32).ln() as f64;
                let hi = (*self.train_sigmas.last().unwrap_or(&1.0) as f32).ln() as f64;
                betas::torch_linspace_f32(hi, lo, n + 1)
                    .into_iter()
                    .map(|l| (l as f32).exp() as f64)
                    .collect()
            }
        };
        if self.use_karras_sigmas {
            let (lo, hi) = match (sigmas.last(), sigmas.first()) {
                (Some(&lo), Some(&hi)) => (lo, hi),
                _ => return Err(Error::invalid("empty sigma schedule")),
            };
            sigmas = betas::karras_sigmas(lo, hi, n);
            let log_sigmas = betas::log_sigmas(&self.train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| betas::f32r(betas::sigma_to_t(s, &log_sigmas)))
                .collect();
        }
        let last = match self.final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0],
        };
        sigmas.push(last);
        self.sigmas = sigmas.into_iter().map(betas::f32r).collect();
        self.timesteps = timesteps;
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

    /// The largest sigma, or sqrt(sigma_max^2 + 1) with "leading" spacing
    /// (diffusers' convention).
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
            .ok_or_else(|| Error::invalid("Euler: step index past the end of the schedule"))?;
        Ok(sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<SchedulerOutput> {
        if !self.ready {
            return Err(Error::invalid(
                "EulerDiscreteScheduler: call set_timesteps before step",
            ));
        }
        betas::check_shape("Euler model_output", model_output, sample)?;
        let i = self.counter.current(&self.timesteps, timestep)?;
        if i + 1 >= self.sigmas.len() {
            return Err(Error::invalid("Euler: step called after the last timestep"));
        }
        let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
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
        let dt = (sigma_next as f32 - sigma as f32) as f64;
        let prev = betas::euler_update(&x, &x0, sigma, dt)?;
        self.counter.step_index = Some(i + 1);
        Ok(SchedulerOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        betas::check_shape("Euler add_noise noise", noise, original)?;
        let i = self.counter.for_add_noise(&self.timesteps, timestep)?;
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid("Euler add_noise: begin_index past the schedule"))?;
        Ok((original + noise.affine(sigma, 0.0)?)?)
    }
}

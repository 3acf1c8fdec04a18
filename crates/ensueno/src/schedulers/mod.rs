//! Noise schedulers: the sampling algorithms of diffusion models.
//!
//! One trait, [`Scheduler`], one file per algorithm, as in diffusers'
//! `schedulers/` package. All are built from a diffusers
//! `scheduler_config.json` ([`SchedulerConfig`]); keys the file leaves out take
//! the default of the scheduler being built, exactly as diffusers'
//! `from_config` does (so an SD 1.5 `PNDMScheduler` config builds an Euler
//! scheduler with Euler's own `timestep_spacing` default).

pub mod betas;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver_multistep;
pub mod euler_ancestral;
pub mod euler_discrete;

pub use config::{SchedulerConfig, SchedulerKind};

use candle_core::Tensor;

use crate::Result;

/// What one call of [`Scheduler::step`] returns.
#[derive(Debug, Clone)]
pub struct SchedulerOutput {
    /// The sample at the previous (less noisy) timestep, x_{t-1}.
    pub prev_sample: Tensor,
    /// The model's current estimate of the clean sample x_0, when the
    /// algorithm computes one (used for previews).
    pub pred_original_sample: Option<Tensor>,
}

/// A diffusion sampling algorithm.
///
/// The life cycle mirrors diffusers: `set_timesteps(n)`, optionally
/// `set_begin_index(i)` (img2img), then for each `t` in `timesteps()`:
/// `scale_model_input`, run the model, `step`. Schedulers are stateful
/// (step counter, multistep history), so one instance serves one generation.
pub trait Scheduler: Send {
    /// Prepares `num_inference_steps` timesteps (and sigmas). Resets all state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps to visit, most noisy first, in the model's timestep units
    /// (they may be fractional, e.g. Euler with Karras sigmas).
    fn timesteps(&self) -> &[f64];

    /// Starts the step counter at `begin_index` of `timesteps()` (img2img
    /// skips the first, noisiest steps).
    fn set_begin_index(&mut self, begin_index: usize);

    /// The standard deviation of the initial noise: latents drawn from N(0, 1)
    /// are multiplied by it.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the denoising model's input for timestep `timestep` (identity
    /// for DDPM/DDIM/DPM-Solver; divides by sqrt(sigma^2 + 1) for Euler).
    fn scale_model_input(&self, sample: Tensor, timestep: f64) -> Result<Tensor>;

    /// One reverse step from `sample` at `timestep` given the model output.
    ///
    /// `noise` must be given (same shape as `sample`) when [`Self::is_stochastic`]
    /// is true; passing it in rather than drawing it inside keeps runs
    /// reproducible and lets tests feed the reference implementation's noise.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<SchedulerOutput>;

    /// Noises `original` to the level of `timestep` (forward process), used by
    /// img2img and by training.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;

    /// Whether `step` consumes fresh noise.
    fn is_stochastic(&self) -> bool {
        false
    }

    /// How many model evaluations one entry of `timesteps()` stands for
    /// (diffusers' `order`; 1 for every scheduler here).
    fn order(&self) -> usize {
        1
    }
}

/// Builds the scheduler `kind` from a diffusers scheduler config.
///
/// The `-karras` kinds switch `use_karras_sigmas` on; the other kinds keep the
/// config's own value, as diffusers does.
pub fn build_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
) -> Result<Box<dyn Scheduler>> {
    let mut config = config.clone();
    if kind == SchedulerKind::DpmPlusPlus2MKarras {
        config.use_karras_sigmas = Some(true);
    }
    let config = &config;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::DDIMScheduler::new(config)?),
        SchedulerKind::Ddpm => Box::new(ddpm::DDPMScheduler::new(config)?),
        SchedulerKind::Euler => Box::new(euler_discrete::EulerDiscreteScheduler::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(
            euler_ancestral::EulerAncestralDiscreteScheduler::new(config)?,
        ),
        SchedulerKind::DpmPlusPlus2M | SchedulerKind::DpmPlusPlus2MKarras => Box::new(
            dpm_solver_multistep::DPMSolverMultistepScheduler::new(config)?,
        ),
    })
}

//! (placeholder until the scheduler lands)
use candle_core::Tensor;

use super::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::{Error, Result};

pub struct DPMSolverMultistepScheduler;

impl DPMSolverMultistepScheduler {
    pub fn new(_config: &SchedulerConfig) -> Result<Self> {
        Err(Error::invalid(
            "DPMSolverMultistepScheduler is not available yet",
        ))
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn set_timesteps(&mut self, _n: usize) -> Result<()> {
        Err(Error::invalid("not available"))
    }
    fn timesteps(&self) -> &[f64] {
        &[]
    }
    fn set_begin_index(&mut self, _i: usize) {}
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: Tensor, _t: f64) -> Result<Tensor> {
        Ok(sample)
    }
    fn step(
        &mut self,
        _m: &Tensor,
        _t: f64,
        _s: &Tensor,
        _n: Option<&Tensor>,
    ) -> Result<SchedulerOutput> {
        Err(Error::invalid("not available"))
    }
    fn add_noise(&self, _o: &Tensor, _n: &Tensor, _t: f64) -> Result<Tensor> {
        Err(Error::invalid("not available"))
    }
}

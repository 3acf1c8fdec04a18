//! The DDPM forward process for training: `x_t = sqrt(ᾱ_t) x_0 +
//! sqrt(1 - ᾱ_t) ε` at integer timesteps, from the same float32 noise
//! schedule the samplers use (Ho, Jain, Abbeel 2020, arXiv:2006.11239;
//! diffusers' `DDPMScheduler.add_noise`), and the pieces every diffusion
//! trainer shares around it.

use candle_core::{Device, Tensor};

use crate::schedulers::SchedulerConfig;
use crate::Result;

/// sqrt(ᾱ_t) and sqrt(1 - ᾱ_t) for every training timestep.
#[derive(Debug, Clone)]
pub struct ForwardProcess {
    sqrt_ab: Vec<f64>,
    sqrt_1m_ab: Vec<f64>,
}

impl ForwardProcess {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = crate::schedulers::betas::NoiseSchedule::from_config(config, false)?;
        Ok(Self {
            sqrt_ab: schedule.alphas_cumprod.iter().map(|a| a.sqrt()).collect(),
            sqrt_1m_ab: schedule
                .alphas_cumprod
                .iter()
                .map(|a| (1. - a).sqrt())
                .collect(),
        })
    }

    /// Noised samples and the timesteps as the UNet takes them.
    ///
    /// # Shapes
    /// `x0`, `noise` [B, C, H, W], `ts` B timesteps -> (`x_t` [B, C, H, W],
    /// `t` f32 [B])
    pub fn noise(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        ts: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let b = ts.len();
        let coef = |v: &[f64]| -> Result<Tensor> {
            let c: Vec<f32> = ts.iter().map(|&t| v[t] as f32).collect();
            Ok(Tensor::from_vec(c, (b, 1, 1, 1), device)?)
        };
        let xt = (x0.broadcast_mul(&coef(&self.sqrt_ab)?)?
            + noise.broadcast_mul(&coef(&self.sqrt_1m_ab)?)?)?;
        let t = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, device)?;
        Ok((xt, t))
    }
}

/// The learning rate at `step` with a linear warm-up over `warmup` steps.
pub fn warmup_lr(base: f64, step: usize, warmup: usize) -> f64 {
    if warmup > 0 && step < warmup {
        base * (step + 1) as f64 / warmup as f64
    } else {
        base
    }
}

/// Adds diffusers' `_class_name` / `_diffusers_version` to a config and
/// drops null keys (diffusers would pass them to constructors as `None`
/// instead of using its defaults).
pub fn with_diffusers_class(value: serde_json::Value, class: &str) -> serde_json::Value {
    let mut value = value;
    if let Some(map) = value.as_object_mut() {
        map.retain(|_, v| !v.is_null());
        map.insert("_class_name".into(), class.into());
        map.insert("_diffusers_version".into(), "0.42.1".into());
    }
    value
}

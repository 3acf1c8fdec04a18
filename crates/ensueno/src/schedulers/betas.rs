//! Noise-schedule arithmetic shared by the schedulers: beta schedules,
//! alphas_cumprod, timestep spacing, sigma interpolation, Karras sigmas, and
//! the config vocabulary (beta schedule, spacing, prediction type).
//!
//! References: DDPM betas (Ho, Jain, Abbeel 2020, arXiv:2006.11239); the
//! cosine schedule (Nichol, Dhariwal 2021, arXiv:2102.09672); zero terminal SNR
//! and timestep spacing (Lin, Liu, Li, Yang 2023, arXiv:2305.08891); Karras
//! sigmas (Karras, Aittala, Aila, Laine 2022, arXiv:2206.00364). Reference
//! implementation: diffusers `schedulers/scheduling_*.py` (0.42).
//!
//! Precision: diffusers keeps betas, alphas_cumprod and sigmas in float32
//! tensors and builds timesteps with numpy's `linspace`/`arange`/`round`. The
//! helpers here reproduce those constructions (values are stored as f64 but
//! rounded through f32 where diffusers stores f32, numpy's round-half-to-even,
//! numpy's `arange` fill rule), so integer timesteps come out identical and
//! sigmas agree to float32 rounding.

use candle_core::{DType, Tensor};

use super::SchedulerConfig;
use crate::{Error, Result};

/// Rounds through f32, as a float32 tensor would store the value.
pub fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// How betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

impl BetaSchedule {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            "squaredcos_cap_v2" => Ok(Self::SquaredcosCapV2),
            _ => Err(unknown(
                "beta_schedule",
                name,
                "linear, scaled_linear, squaredcos_cap_v2",
            )),
        }
    }
}

/// How inference timesteps are picked among the training ones
/// (`timestep_spacing`, Table 2 of arXiv:2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            "linspace" => Ok(Self::Linspace),
            _ => Err(unknown(
                "timestep_spacing",
                name,
                "leading, trailing, linspace",
            )),
        }
    }
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// The velocity v = alpha_t * eps - sigma_t * x0 (Salimans, Ho 2022, arXiv:2202.00512).
    VPrediction,
    /// The clean sample x0.
    Sample,
}

impl PredictionType {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            // diffusers' Euler accepts the older spelling too.
            "sample" | "original_sample" => Ok(Self::Sample),
            _ => Err(unknown(
                "prediction_type",
                name,
                "epsilon, v_prediction, sample",
            )),
        }
    }
}

/// The last sigma of a sigma-based schedule (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

impl FinalSigmas {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "zero" => Ok(Self::Zero),
            "sigma_min" => Ok(Self::SigmaMin),
            _ => Err(unknown("final_sigmas_type", name, "zero, sigma_min")),
        }
    }
}

pub(crate) fn unknown(kind: &'static str, name: &str, expected: &str) -> Error {
    Error::UnknownName {
        kind,
        name: name.to_string(),
        expected: expected.to_string(),
    }
}

/// Rejects config switches that this crate does not implement, with a message
/// naming the key.
pub(crate) fn reject_thresholding(config: &SchedulerConfig, scheduler: &str) -> Result<()> {
    if config.thresholding == Some(true) {
        return Err(Error::invalid(format!(
            "{scheduler}: thresholding=true (dynamic thresholding) is not supported; \
             set \"thresholding\": false in scheduler_config.json"
        )));
    }
    Ok(())
}

/// The training noise schedule: betas and their cumulative alpha products, as
/// float32 values (diffusers' `self.betas`, `self.alphas_cumprod`).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds the schedule from the config keys `num_train_timesteps`,
    /// `beta_start`, `beta_end`, `beta_schedule`, `trained_betas` and
    /// `rescale_betas_zero_snr` (defaults: 1000, 0.0001, 0.02, linear, as every
    /// scheduler here). `terminal_floor`: the sigma-based schedulers replace a
    /// zero terminal alphas_cumprod by 2^-24 so the largest sigma stays finite.
    pub fn from_config(config: &SchedulerConfig, terminal_floor: bool) -> Result<Self> {
        let n = num_train_timesteps(config)?;
        let betas = match &config.trained_betas {
            Some(b) => {
                if b.len() != n {
                    return Err(Error::invalid(format!(
                        "trained_betas has {} values but num_train_timesteps is {n}",
                        b.len()
                    )));
                }
                b.iter().map(|&x| f32r(x)).collect()
            }
            None => {
                let start = config.beta_start.unwrap_or(0.0001);
                let end = config.beta_end.unwrap_or(0.02);
                let schedule =
                    BetaSchedule::parse(config.beta_schedule.as_deref().unwrap_or("linear"))?;
                match schedule {
                    BetaSchedule::Linear => torch_linspace_f32(start, end, n),
                    BetaSchedule::ScaledLinear => torch_linspace_f32(start.sqrt(), end.sqrt(), n)
                        .into_iter()
                        .map(|v| {
                            let v = v as f32;
                            (v * v) as f64
                        })
                        .collect(),
                    BetaSchedule::SquaredcosCapV2 => cosine_betas(n, 0.999),
                }
            }
        };
        if betas
            .iter()
            .any(|b| !b.is_finite() || *b < 0.0 || *b >= 1.0)
        {
            return Err(Error::invalid(
                "scheduler betas must lie in [0, 1): check beta_start, beta_end and trained_betas",
            ));
        }
        let betas = if config.rescale_betas_zero_snr.unwrap_or(false) {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let mut alphas_cumprod = cumprod_alphas(&betas);
        if terminal_floor && config.rescale_betas_zero_snr.unwrap_or(false) {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f64.powi(-24);
            }
        }
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    /// sigma_t = sqrt((1 - alphas_cumprod) / alphas_cumprod) for every
    /// training timestep, ascending in t, in float32 arithmetic as diffusers.
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                ((1.0 - a) / a).sqrt() as f64
            })
            .collect()
    }
}

/// `num_train_timesteps` (default 1000), which must be positive.
pub fn num_train_timesteps(config: &SchedulerConfig) -> Result<usize> {
    match config.num_train_timesteps.unwrap_or(1000) {
        0 => Err(Error::invalid("num_train_timesteps must be positive")),
        n => Ok(n),
    }
}

/// Checks a requested number of inference steps against the training schedule.
pub fn check_num_inference_steps(steps: usize, num_train_timesteps: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::invalid("num_inference_steps must be at least 1"));
    }
    if steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "num_inference_steps {steps} is larger than the {num_train_timesteps} timesteps the model was trained with"
        )));
    }
    Ok(())
}

/// torch.linspace(start, end, steps, dtype=float32) (its scalar kernel: the
/// first half counts up from `start`, the second half down from `end`).
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f64> {
    let (s, e) = (start as f32, end as f32);
    if steps == 1 {
        return vec![s as f64];
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                (s + step * i as f32) as f64
            } else {
                (e - step * (steps - i - 1) as f32) as f64
            }
        })
        .collect()
}

/// The squaredcos_cap_v2 betas (Nichol & Dhariwal's cosine alpha_bar), in f64
/// then stored as float32.
fn cosine_betas(n: usize, max_beta: f64) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            f32r((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta))
        })
        .collect()
}

/// Cumulative product of (1 - beta): alphas in float32, the product
/// accumulated in double and stored as float32 (torch's CPU cumprod).
fn cumprod_alphas(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b as f32) as f64;
            f32r(acc)
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (arXiv:2305.08891, Algorithm 1), in
/// float32 arithmetic like diffusers.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let sqrt_bar: Vec<f32> = cumprod_alphas(betas)
        .iter()
        .map(|&a| (a as f32).sqrt())
        .collect();
    let (first, last) = match (sqrt_bar.first(), sqrt_bar.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|&s| {
            let s = (s - last) * scale;
            s * s
        })
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push((1.0 - bar[0]) as f64);
    for w in bar.windows(2) {
        out.push((1.0 - w[1] / w[0]) as f64);
    }
    out
}

/// numpy.linspace(start, stop, num) in float64: `i * step + start`, the last
/// value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// numpy.arange(start, stop, step) for floats: length ceil((stop-start)/step),
/// values `start + i * ((start + step) - start)` (numpy's fill rule).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut v = Vec::with_capacity(len);
    v.push(start);
    if len > 1 {
        v.push(start + step);
        let delta = v[1] - v[0];
        for i in 2..len {
            v.push(start + i as f64 * delta);
        }
    }
    v
}

/// Inference timesteps, most noisy first, for the DDPM/DDIM/Euler family.
///
/// `round_linspace`: the integer schedulers round "linspace" timesteps, Euler
/// keeps them fractional (as float32).
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: usize,
    round_linspace: bool,
) -> Vec<f64> {
    let t = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|x| {
                if round_linspace {
                    x.round_ties_even()
                } else {
                    f32r(x)
                }
            })
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(t, steps),
    }
}

/// "trailing" spacing: round(arange(T, 0, -T/n)) - 1. numpy's arange can
/// yield one value too many for some n (a float remainder near 0, which
/// diffusers turns into timestep -1); only the first n are kept.
pub fn trailing(num_train_timesteps: usize, steps: usize) -> Vec<f64> {
    let t = num_train_timesteps as f64;
    np_arange(t, 0.0, -(t / steps as f64))
        .into_iter()
        .take(steps)
        .map(|x| x.round_ties_even() - 1.0)
        .collect()
}

/// numpy.interp(x, arange(len(fp)), fp).
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// Karras et al.'s sigmas (rho = 7) from `sigma_max` down to `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// The natural log of each training sigma, in float32 (numpy's log of a
/// float32 array).
pub fn log_sigmas(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|&s| (s as f32).ln() as f64)
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating
/// linearly in log sigma (diffusers' `_sigma_to_t`). `log_sigmas` ascends
/// with t.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // Index where the running count of (log_sigma >= log_sigmas[i]) first
    // reaches its maximum, clipped to leave room for a right neighbour.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = i;
        }
    }
    let low_idx = best_idx.min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    // numpy subtracts the two float32 scalars in float32.
    let w = ((low - log_sigma) / ((low as f32 - high as f32) as f64)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The position of `timestep` in `schedule`; the second one when it occurs
/// twice (so a schedule entered at its start does not skip a sigma), as
/// diffusers' `index_for_timestep`.
pub fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let mut hits = schedule
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = hits.next()?;
    Some(hits.next().unwrap_or(first))
}

/// `timestep` as an index into the training schedule, if it is one.
pub fn train_index(timestep: f64, num_train_timesteps: usize) -> Result<usize> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= num_train_timesteps as f64 {
        return Err(Error::invalid(format!(
            "timestep {timestep} is not an integer in [0, {num_train_timesteps})"
        )));
    }
    Ok(timestep as usize)
}

/// The dtype scheduler arithmetic runs in: f32 for half types (diffusers
/// upcasts the sample too), else the input's own.
pub(crate) fn compute_dtype(t: &Tensor) -> DType {
    match t.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `t` in the compute dtype.
pub(crate) fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(compute_dtype(t))?)
}

/// a * x + b * y.
pub(crate) fn lin2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

/// The Euler update x + (x - x0) / sigma * dt with the operation order and
/// float32 scalars of diffusers: with a huge first sigma (cosine schedule) the
/// result is a small difference of large numbers, and only the same rounding
/// reproduces diffusers' numbers.
pub(crate) fn euler_update(x: &Tensor, x0: &Tensor, sigma: f64, dt: f64) -> Result<Tensor> {
    let scalar =
        |v: f64| -> Result<Tensor> { Ok(Tensor::new(f32r(v), x.device())?.to_dtype(x.dtype())?) };
    let derivative = (x - x0)?.broadcast_div(&scalar(sigma)?)?;
    Ok((x + derivative.broadcast_mul(&scalar(dt)?)?)?)
}

/// Fails unless `got` has the shape of `expected`.
pub(crate) fn check_shape(what: &str, got: &Tensor, expected: &Tensor) -> Result<()> {
    if got.dims() != expected.dims() {
        return Err(Error::Shape {
            what: what.to_string(),
            expected: format!("{:?}", expected.dims()),
            got: format!("{:?}", got.dims()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_constructions() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // Half-way values round to even, as numpy.
        let ts = spaced_timesteps(TimestepSpacing::Linspace, 1000, 25, 0, true);
        assert_eq!(ts[25 - 5], 166.0);
        assert_eq!(trailing(1000, 61).len(), 61);
        assert_eq!(interp(1.5, &[0.0, 2.0, 4.0]), 3.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_schedule() {
        let cfg = SchedulerConfig::stable_diffusion_v1();
        let s = NoiseSchedule::from_config(&cfg, false).unwrap().sigmas();
        let ls = log_sigmas(&s);
        assert!((sigma_to_t(s[500], &ls) - 500.0).abs() < 1e-3);
        assert_eq!(sigma_to_t(s[999] * 2.0, &ls), 999.0);
        assert_eq!(sigma_to_t(s[0] / 2.0, &ls), 0.0);
    }
}

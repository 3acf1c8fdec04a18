//! DPM-Solver / DPM-Solver++ multistep samplers (orders 1 to 3), the
//! "DPM++ 2M" family, optionally on Karras sigmas.
//!
//! Papers: Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver: A Fast ODE Solver for
//! Diffusion Probabilistic Model Sampling in Around 10 Steps", 2022,
//! arXiv:2206.00927; "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models", 2022, arXiv:2211.01095. Reference
//! implementation: diffusers `schedulers/scheduling_dpmsolver_multistep.py`
//! (`DPMSolverMultistepScheduler`, 0.42). The SDE variants are not offered.

use candle_core::Tensor;

use super::betas::{self, FinalSigmas, NoiseSchedule, PredictionType, TimestepSpacing};
use super::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::{Error, Result};

/// Whether the solver integrates the data (x0) or the noise prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    /// DPM-Solver++: data prediction.
    DpmSolverPlusPlus,
    /// DPM-Solver: noise prediction.
    DpmSolver,
}

/// How the second-order update combines the two model outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a VE sigma.
#[derive(Debug, Clone, Copy)]
struct Point {
    alpha: f64,
    sigma: f64,
    lambda: f64,
}

impl Point {
    fn new(sigma_ve: f64) -> Self {
        let alpha = 1.0 / (sigma_ve * sigma_ve + 1.0).sqrt();
        let sigma = sigma_ve * alpha;
        // sigma = 0 (final step) gives lambda = +inf, and the updates below
        // then reduce to x = D0 through exp(-inf) = 0, as in diffusers.
        Self {
            alpha,
            sigma,
            lambda: alpha.ln() - sigma.ln(),
        }
    }
}

/// The multistep DPM-Solver(++) sampler.
#[derive(Debug, Clone)]
pub struct DPMSolverMultistepScheduler {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f64>,
    /// Training sigmas, ascending in t (float32 values).
    train_sigmas: Vec<f64>,
    solver_order: usize,
    algorithm: Algorithm,
    solver_type: SolverType,
    prediction_type: PredictionType,
    lower_order_final: bool,
    euler_at_final: bool,
    use_karras_sigmas: bool,
    final_sigmas: FinalSigmas,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    /// Karras timesteps are rounded except for the cosine schedule.
    round_karras_timesteps: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    ready: bool,
}

impl DPMSolverMultistepScheduler {
    /// Builds the scheduler; missing keys take its defaults (linear betas
    /// 0.0001..0.02, solver_order 2, "dpmsolver++", "midpoint",
    /// lower_order_final true, euler_at_final false, no Karras sigmas, final
    /// sigma zero, "linspace" spacing, epsilon).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        betas::reject_thresholding(config, "DPMSolverMultistepScheduler")?;
        let algorithm = match config.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            // diffusers maps "deis" onto DPM-Solver++.
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPlusPlus,
            "dpmsolver" => Algorithm::DpmSolver,
            other @ ("sde-dpmsolver++" | "sde-dpmsolver") => {
                return Err(Error::invalid(format!(
                    "DPMSolverMultistepScheduler: algorithm_type \"{other}\" (SDE) is not supported; use dpmsolver++"
                )))
            }
            other => {
                return Err(betas::unknown(
                    "algorithm_type",
                    other,
                    "dpmsolver++, dpmsolver",
                ))
            }
        };
        let solver_type = match config.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the UniPC/DEIS solver names onto midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(betas::unknown("solver_type", other, "midpoint, heun")),
        };
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::invalid(format!(
                "DPMSolverMultistepScheduler: solver_order must be 1, 2 or 3, got {solver_order}"
            )));
        }
        let final_sigmas =
            FinalSigmas::parse(config.final_sigmas_type.as_deref().unwrap_or("zero"))?;
        if algorithm == Algorithm::DpmSolver && final_sigmas == FinalSigmas::Zero {
            return Err(Error::invalid(
                "DPMSolverMultistepScheduler: algorithm_type \"dpmsolver\" needs final_sigmas_type \"sigma_min\"",
            ));
        }
        if matches!(
            config.variance_type.as_deref(),
            Some("learned") | Some("learned_range")
        ) {
            return Err(Error::invalid(
                "DPMSolverMultistepScheduler: learned variance_type is not supported",
            ));
        }
        let schedule = NoiseSchedule::from_config(config, true)?;
        let train_sigmas = schedule.sigmas();
        let num_train_timesteps = train_sigmas.len();
        // diffusers looks at the key alone, even when trained_betas override it.
        let cosine = config.beta_schedule.as_deref() == Some("squaredcos_cap_v2");
        Ok(Self {
            num_train_timesteps,
            solver_order,
            algorithm,
            solver_type,
            prediction_type: PredictionType::parse(
                config.prediction_type.as_deref().unwrap_or("epsilon"),
            )?,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
            final_sigmas,
            timestep_spacing: TimestepSpacing::parse(
                config.timestep_spacing.as_deref().unwrap_or("linspace"),
            )?,
            steps_offset: config.steps_offset.unwrap_or(0),
            round_karras_timesteps: !cosine,
            timesteps: (0..num_train_timesteps).rev().map(|t| t as f64).collect(),
            sigmas: train_sigmas.clone(),
            alphas_cumprod: schedule.alphas_cumprod,
            train_sigmas,
            step_index: None,
            begin_index: None,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
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

    /// Inference timesteps before any Karras remapping.
    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let t = self.num_train_timesteps;
        match self.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = betas::np_linspace(0.0, (t - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(|x| x.round_ties_even())
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = t / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => betas::trailing(t, n),
        }
    }

    /// The model output in the solver's variable: x0 for DPM-Solver++, the
    /// noise for DPM-Solver; and the x0 estimate either way.
    fn convert(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        p: Point,
    ) -> Result<(Tensor, Tensor)> {
        let (a, s) = (p.alpha, p.sigma);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => betas::lin2(1.0 / a, sample, -s / a, model_output)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => betas::lin2(a, sample, -s, model_output)?,
        };
        let converted = match self.algorithm {
            Algorithm::DpmSolverPlusPlus => x0.clone(),
            Algorithm::DpmSolver => match self.prediction_type {
                PredictionType::Epsilon => model_output.clone(),
                PredictionType::Sample => betas::lin2(1.0 / s, sample, -a / s, model_output)?,
                PredictionType::VPrediction => betas::lin2(a, model_output, s, sample)?,
            },
        };
        Ok((converted, x0))
    }

    fn index_for_timestep(&self, timestep: f64) -> usize {
        // diffusers falls back to the last step for an unknown timestep.
        betas::index_for_timestep(&self.timesteps, timestep)
            .unwrap_or(self.timesteps.len().saturating_sub(1))
    }

    fn first_order(&self, i: usize, sample: &Tensor, m0: &Tensor) -> Result<Tensor> {
        let t = Point::new(self.sigmas[i + 1]);
        let s0 = Point::new(self.sigmas[i]);
        let h = t.lambda - s0.lambda;
        match self.algorithm {
            Algorithm::DpmSolverPlusPlus => betas::lin2(
                t.sigma / s0.sigma,
                sample,
                -t.alpha * ((-h).exp() - 1.0),
                m0,
            ),
            Algorithm::DpmSolver => {
                betas::lin2(t.alpha / s0.alpha, sample, -t.sigma * (h.exp() - 1.0), m0)
            }
        }
    }

    fn second_order(&self, i: usize, sample: &Tensor, m0: &Tensor, m1: &Tensor) -> Result<Tensor> {
        let t = Point::new(self.sigmas[i + 1]);
        let s0 = Point::new(self.sigmas[i]);
        let s1 = Point::new(self.sigmas[i - 1]);
        let h = t.lambda - s0.lambda;
        let h0 = s0.lambda - s1.lambda;
        let r0 = h0 / h;
        // D1 = (m0 - m1) / r0
        let d1 = (m0 - m1)?.affine(1.0 / r0, 0.0)?;
        let (c_x, c_d0, c_d1) = match (self.algorithm, self.solver_type) {
            (Algorithm::DpmSolverPlusPlus, SolverType::Midpoint) => {
                let e = (-h).exp() - 1.0;
                (t.sigma / s0.sigma, -t.alpha * e, -0.5 * t.alpha * e)
            }
            (Algorithm::DpmSolverPlusPlus, SolverType::Heun) => {
                let e = (-h).exp() - 1.0;
                (t.sigma / s0.sigma, -t.alpha * e, t.alpha * (e / h + 1.0))
            }
            (Algorithm::DpmSolver, SolverType::Midpoint) => {
                let e = h.exp() - 1.0;
                (t.alpha / s0.alpha, -t.sigma * e, -0.5 * t.sigma * e)
            }
            (Algorithm::DpmSolver, SolverType::Heun) => {
                let e = h.exp() - 1.0;
                (t.alpha / s0.alpha, -t.sigma * e, -t.sigma * (e / h - 1.0))
            }
        };
        Ok((betas::lin2(c_x, sample, c_d0, m0)? + d1.affine(c_d1, 0.0)?)?)
    }

    fn third_order(
        &self,
        i: usize,
        sample: &Tensor,
        m0: &Tensor,
        m1: &Tensor,
        m2: &Tensor,
    ) -> Result<Tensor> {
        let t = Point::new(self.sigmas[i + 1]);
        let s0 = Point::new(self.sigmas[i]);
        let s1 = Point::new(self.sigmas[i - 1]);
        let s2 = Point::new(self.sigmas[i - 2]);
        let h = t.lambda - s0.lambda;
        let (h0, h1) = (s0.lambda - s1.lambda, s1.lambda - s2.lambda);
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = (m0 - m1)?.affine(1.0 / r0, 0.0)?;
        let d1_1 = (m1 - m2)?.affine(1.0 / r1, 0.0)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + diff.affine(r0 / (r0 + r1), 0.0)?)?;
        let d2 = diff.affine(1.0 / (r0 + r1), 0.0)?;
        let (c_x, c_d0, c_d1, c_d2) = match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let e = (-h).exp() - 1.0;
                (
                    t.sigma / s0.sigma,
                    -t.alpha * e,
                    t.alpha * (e / h + 1.0),
                    -t.alpha * ((e + h) / (h * h) - 0.5),
                )
            }
            Algorithm::DpmSolver => {
                let e = h.exp() - 1.0;
                (
                    t.alpha / s0.alpha,
                    -t.sigma * e,
                    -t.sigma * (e / h - 1.0),
                    -t.sigma * ((e - h) / (h * h) - 0.5),
                )
            }
        };
        let x = betas::lin2(c_x, sample, c_d0, m0)?;
        Ok((x + betas::lin2(c_d1, &d1, c_d2, &d2)?)?)
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        betas::check_num_inference_steps(n, self.num_train_timesteps)?;
        let mut timesteps = self.spaced_timesteps(n);
        let mut sigmas: Vec<f64> = if self.use_karras_sigmas {
            let (lo, hi) = match (self.train_sigmas.first(), self.train_sigmas.last()) {
                (Some(&lo), Some(&hi)) => (lo, hi),
                _ => return Err(Error::invalid("empty sigma schedule")),
            };
            let sigmas = betas::karras_sigmas(lo, hi, n);
            let log_sigmas = betas::log_sigmas(&self.train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = betas::sigma_to_t(s, &log_sigmas);
                    // Rounded, or (cosine schedule) truncated by the int64 cast.
                    if self.round_karras_timesteps {
                        t.round_ties_even()
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| betas::interp(t, &self.train_sigmas))
                .collect()
        };
        sigmas.push(match self.final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0],
        });
        self.sigmas = sigmas.into_iter().map(betas::f32r).collect();
        self.timesteps = timesteps;
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.step_index = None;
        self.begin_index = None;
        self.ready = true;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

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
        if !self.ready {
            return Err(Error::invalid(
                "DPMSolverMultistepScheduler: call set_timesteps before step",
            ));
        }
        betas::check_shape("DPM-Solver model_output", model_output, sample)?;
        let i = match (self.step_index, self.begin_index) {
            (Some(i), _) | (None, Some(i)) => i,
            (None, None) => self.index_for_timestep(timestep),
        };
        let n = self.timesteps.len();
        if i >= n {
            return Err(Error::invalid(
                "DPM-Solver: step called after the last timestep",
            ));
        }
        let lower_order_final = i == n - 1
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigmas == FinalSigmas::Zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;

        let dtype = model_output.dtype();
        let x = betas::upcast(sample)?;
        let m = model_output.to_dtype(x.dtype())?;
        let (converted, x0) = self.convert(&m, &x, Point::new(self.sigmas[i]))?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));

        let history = |k: usize| -> Result<&Tensor> {
            self.model_outputs[self.solver_order - 1 - k]
                .as_ref()
                .ok_or_else(|| Error::invalid("DPM-Solver: missing model output history"))
        };
        let m0 = history(0)?;
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &x, m0)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, &x, m0, history(1)?)?
        } else {
            self.third_order(i, &x, m0, history(1)?, history(2)?)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(SchedulerOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: Some(x0.to_dtype(dtype)?),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        betas::check_shape("DPM-Solver add_noise noise", noise, original)?;
        let i = match (self.begin_index, self.step_index) {
            (None, _) => self.index_for_timestep(timestep),
            (Some(_), Some(i)) => i,
            (Some(b), None) => b,
        };
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid("DPM-Solver add_noise: begin_index past the schedule"))?;
        let p = Point::new(sigma);
        betas::lin2(p.alpha, original, p.sigma, noise)
    }
}

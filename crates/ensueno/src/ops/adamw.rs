//! AdamW optimiser, fused into one in-place pass per parameter on the CPU.
//!
//! Decoupled Weight Decay Regularization (Ilya Loshchilov, Frank Hutter,
//! 2017, arXiv:1711.05101), on top of Adam (Diederik P. Kingma, Jimmy Ba,
//! 2014, arXiv:1412.6980). Semantics of `torch.optim.AdamW` (no amsgrad):
//! `p *= 1 - lr * wd`, moments `m = lerp(m, g, 1 - b1)`,
//! `v = b2 * v + (1 - b2) * g^2`, then
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//!
//! candle_nn's `AdamW` builds about a dozen temporary tensors per parameter
//! and step; here f32 CPU parameters are updated in place in a single sweep
//! over (param, grad, m, v), with the moments held as plain vectors. Other
//! dtypes and devices use composite tensor ops with the same formula.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};

use super::group_norm::{multiversion, par_for, SyncPtr};
use crate::{Error, Result};

enum Moments {
    /// f32 parameters on the CPU: moments updated by the fused kernel.
    Cpu { m: Vec<f32>, v: Vec<f32> },
    /// Anything else: moments as tensors of the parameter's dtype and device.
    Tensor { m: Tensor, v: Tensor },
}

struct ParamState {
    var: Var,
    moments: Moments,
}

/// Fused AdamW over a list of [`Var`]s (implements [`candle_nn::Optimizer`]).
pub struct AdamW {
    params: Vec<ParamState>,
    step_t: usize,
    config: ParamsAdamW,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.params.len())
            .field("step_t", &self.step_t)
            .field("config", &self.config)
            .finish()
    }
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, config: ParamsAdamW) -> candle_core::Result<Self> {
        let params = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                let moments = if is_fast(&var) {
                    let n = var.elem_count();
                    Moments::Cpu {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    Moments::Tensor {
                        m: var.zeros_like()?,
                        v: var.zeros_like()?,
                    }
                };
                Ok(ParamState { var, moments })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            step_t: 0,
            config,
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let c = &self.config;
        let t = self.step_t as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let coefs = Coefs {
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            step_size: (c.lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            eps: c.eps as f32,
        };
        for p in self.params.iter_mut() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            match &mut p.moments {
                Moments::Cpu { m, v } => {
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let op = FusedStep {
                        moments: RefCell::new((m.as_mut_slice(), v.as_mut_slice())),
                        coefs,
                    };
                    p.var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Tensor { m, v } => {
                    // Detached: a gradient records the ops that made it
                    // (down to the step's activations), and moments built
                    // from it would keep every past step's graph alive, one
                    // step's activations of memory per step.
                    let theta = p.var.as_tensor().detach();
                    let g = g.to_dtype(theta.dtype())?.detach();
                    let next_m = (&*m + ((&g - &*m)? * (1.0 - c.beta1))?)?;
                    let next_v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((next_v.sqrt()? * (1.0 / bc2.sqrt()))? + c.eps)?;
                    let update = ((&next_m / denom)? * (c.lr / bc1))?;
                    let next_theta = ((&theta * (1.0 - c.lr * c.weight_decay))? - update)?;
                    p.var.set(&next_theta)?;
                    *m = next_m;
                    *v = next_v;
                }
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr
    }
}

fn is_fast(var: &Var) -> bool {
    var.dtype() == DType::F32 && var.device().is_cpu() && var.is_contiguous()
}

impl AdamW {
    pub fn params(&self) -> &ParamsAdamW {
        &self.config
    }

    pub fn set_params(&mut self, config: ParamsAdamW) {
        self.config = config;
    }

    /// Number of steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// The optimiser state as named tensors, for checkpoints:
    /// `"{i}.exp_avg"`, `"{i}.exp_avg_sq"` for the i-th (float) parameter in
    /// the order given to `new` (names as in PyTorch's AdamW state), and
    /// `"step"` (i64, shape `[1]`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, p) in self.params.iter().enumerate() {
            let (m, v) = match &p.moments {
                Moments::Cpu { m, v } => {
                    let shape = p.var.shape().clone();
                    (
                        Tensor::from_slice(m, shape.clone(), &candle_core::Device::Cpu)?,
                        Tensor::from_slice(v, shape, &candle_core::Device::Cpu)?,
                    )
                }
                Moments::Tensor { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("{i}.exp_avg"), m);
            out.insert(format!("{i}.exp_avg_sq"), v);
        }
        out.insert(
            "step".to_string(),
            Tensor::new(&[self.step_t as i64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores a state saved by [`AdamW::state`] for the same parameters.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |name: &str| {
            state
                .get(name)
                .ok_or_else(|| Error::invalid(format!("AdamW state: missing tensor '{name}'")))
        };
        let step = get("step")?
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        let step = match step.as_slice() {
            [s] if *s >= 0 => *s as usize,
            _ => return Err(Error::invalid("AdamW state: 'step' must hold one count")),
        };
        // Check everything before changing anything.
        let mut loaded = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let mut pair = Vec::with_capacity(2);
            for key in ["exp_avg", "exp_avg_sq"] {
                let name = format!("{i}.{key}");
                let t = get(&name)?;
                if t.dims() != p.var.dims() {
                    return Err(Error::Shape {
                        what: format!("AdamW state '{name}'"),
                        expected: format!("{:?}", p.var.dims()),
                        got: format!("{:?}", t.dims()),
                    });
                }
                pair.push(t.clone());
            }
            loaded.push(pair);
        }
        for (p, pair) in self.params.iter_mut().zip(loaded) {
            match &mut p.moments {
                Moments::Cpu { m, v } => {
                    *m = pair[0].to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    *v = pair[1].to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                }
                Moments::Tensor { m, v } => {
                    let (dtype, device) = (p.var.dtype(), p.var.device());
                    *m = pair[0].to_dtype(dtype)?.to_device(device)?;
                    *v = pair[1].to_dtype(dtype)?.to_device(device)?;
                }
            }
        }
        self.step_t = step;
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Coefs {
    decay: f32,
    beta1: f32,
    beta2: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
}

struct FusedStep<'a> {
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
    coefs: Coefs,
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "ensueno-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let CpuStorage::F32(p) = s1 else {
            candle_core::bail!("adamw: expected an f32 parameter");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw: expected contiguous tensors");
        };
        let p = &mut p[p0..p1];
        let g = &s2.as_slice::<f32>()?[g0..g1];
        let mut guard = self.moments.borrow_mut();
        let (m, v) = &mut *guard;
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!("adamw: gradient or state size does not match the parameter");
        }
        let n = p.len();
        let (pp, mp, vp) = (
            SyncPtr(p.as_mut_ptr()),
            SyncPtr(m.as_mut_ptr()),
            SyncPtr(v.as_mut_ptr()),
        );
        let coefs = self.coefs;
        par_for(n.div_ceil(CHUNK), n >= 4 * CHUNK, |i| {
            let start = i * CHUNK;
            let len = CHUNK.min(n - start);
            // SAFETY: chunks are disjoint.
            let (p, m, v) = unsafe {
                (
                    pp.slice(start, len),
                    mp.slice(start, len),
                    vp.slice(start, len),
                )
            };
            adamw_kernel(p, &g[start..start + len], m, v, coefs);
        });
        Ok(())
    }
}

multiversion! {
    fn adamw_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coefs) {
        let one_m_b1 = 1.0 - c.beta1;
        let one_m_b2 = 1.0 - c.beta2;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let pd = *p * c.decay;
            let mn = one_m_b1.mul_add(g - *m, *m);
            let vn = (one_m_b2 * g).mul_add(g, *v * c.beta2);
            let denom = vn.sqrt() * c.inv_bc2_sqrt + c.eps;
            *m = mn;
            *v = vn;
            *p = pd - c.step_size * mn / denom;
        }
    }
}

//! Batch normalisation with batch statistics, optionally fused with ReLU or
//! LeakyReLU, as a candle custom op.
//!
//! Paper: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network
//! Training by Reducing Internal Covariate Shift", 2015, arXiv:1502.03167.
//! Semantics of PyTorch's `torch.nn.BatchNorm2d` (the reference of the
//! DCGAN twin, `scripts/twins/gan.py`): training normalises with the biased
//! batch variance and moves the running statistics by `momentum` with the
//! unbiased one; evaluation uses the running statistics.
//!
//! `candle_nn::BatchNorm` in training runs about a dozen composite ops (a
//! transposed copy, two means, subtract, square, divide, scale, shift), each
//! a pass over memory and a hand-off to candle's thread pool, and as many
//! again in backward. Here the CPU f32 path computes a channel's statistics
//! (f64 accumulation), the affine map and the activation in one write of the
//! output, and the backward pass in two sweeps per channel. Other dtypes and
//! devices, and evaluation, use the composite form.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, Var};
use candle_nn::VarBuilder;

use super::group_norm::{multiversion, par_for, sum_lanes, sum_sq_dev_lanes, SyncPtr};
use crate::{Error, Result};

/// The element-wise function applied after the affine map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    /// `max(x, slope x)`, `slope` in `[0, 1)`.
    LeakyRelu(f32),
}

impl Activation {
    /// The slope for negative inputs (1 for the identity).
    fn negative_slope(self) -> f32 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => 0.0,
            Activation::LeakyRelu(s) => s,
        }
    }

    /// The activation from candle ops (any device and dtype).
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Identity => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::LeakyRelu(s) => x.maximum(&(x * s as f64)?),
        }
    }
}

/// PyTorch's `BatchNorm2d(channels, eps, momentum)` (affine, tracking
/// running statistics). Loads and saves the keys `weight`, `bias`,
/// `running_mean` and `running_var`, like `candle_nn::batch_norm`.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Var,
    pub running_var: Var,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm2d {
    pub fn new(vb: VarBuilder, channels: usize, eps: f64, momentum: f64) -> Result<Self> {
        if !(eps >= 0.0 && (0.0..=1.0).contains(&momentum)) {
            return Err(Error::invalid(format!(
                "batch norm: eps {eps} must be >= 0 and momentum {momentum} in [0, 1]"
            )));
        }
        let running_mean =
            vb.get_with_hints(channels, "running_mean", candle_nn::Init::Const(0.))?;
        let running_var = vb.get_with_hints(channels, "running_var", candle_nn::Init::Const(1.))?;
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
            // Sharing the VarBuilder's storage (for a VarMap, its variable),
            // so updates reach the saved checkpoint.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps,
            momentum,
        })
    }

    /// `act(batch_norm(x))`: with batch statistics (and the running
    /// statistics updated) when `train`, with the running statistics
    /// otherwise.
    ///
    /// # Shapes
    /// `x`: `[N, C, *]` -> same shape.
    pub fn forward_t(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let dims = x.dims();
        let channels = self.weight.dim(0)?;
        if dims.len() < 2 || dims[1] != channels {
            return Err(Error::Shape {
                what: "batch norm input".into(),
                expected: format!("[N, {channels}, *]"),
                got: format!("{dims:?}"),
            });
        }
        if let Activation::LeakyRelu(s) = act {
            if !(0.0..1.0).contains(&s) {
                return Err(Error::invalid(format!(
                    "batch norm: LeakyReLU slope {s} must be in [0, 1)"
                )));
            }
        }
        let m: usize = dims[0] * dims[2..].iter().product::<usize>();
        if !train {
            return Ok(self.forward_eval(x, act)?);
        }
        if m < 2 {
            return Err(Error::invalid(format!(
                "batch norm: training needs more than one value per channel, got input {dims:?}"
            )));
        }
        let fast = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.dtype() == DType::F32;
        let (y, mean, var) = if fast {
            let stats = Arc::new(Mutex::new(Vec::new()));
            let op = BatchNormOp {
                eps: self.eps as f32,
                slope: act.negative_slope(),
                stats: stats.clone(),
            };
            let y = x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                op,
            )?;
            let stats = stats.lock().map(|s| s.clone()).unwrap_or_default();
            let mean: Vec<f32> = stats.iter().map(|s| s.mean).collect();
            let var: Vec<f32> = stats.iter().map(|s| s.var).collect();
            let dev = x.device();
            (
                y,
                Tensor::from_vec(mean, channels, dev)?,
                Tensor::from_vec(var, channels, dev)?,
            )
        } else {
            self.forward_train_composite(x, act)?
        };
        let keep = 1.0 - self.momentum;
        let unbiased = m as f64 / (m as f64 - 1.0);
        let rm = ((self.running_mean.as_tensor() * keep)?
            + (mean.to_dtype(self.running_mean.dtype())? * self.momentum)?)?;
        let rv = ((self.running_var.as_tensor() * keep)?
            + (var.to_dtype(self.running_var.dtype())? * (self.momentum * unbiased))?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(y)
    }

    /// The training forward from basic candle ops (any device and dtype):
    /// the output, and the batch mean and biased variance per channel.
    pub fn forward_train_composite(
        &self,
        x: &Tensor,
        act: Activation,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let dims = x.dims().to_vec();
        let c = dims[1];
        let internal = match x.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        // [C, N * S]: one row per channel.
        let xc = x
            .to_dtype(internal)?
            .transpose(0, 1)?
            .flatten_from(1)?
            .contiguous()?;
        let mean = xc.mean_keepdim(1)?;
        let centred = xc.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let xn = centred.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        let w = self.weight.to_dtype(internal)?.reshape((c, 1))?;
        let b = self.bias.to_dtype(internal)?.reshape((c, 1))?;
        let y = xn.broadcast_mul(&w)?.broadcast_add(&b)?;
        let mut tdims = dims.clone();
        tdims.swap(0, 1);
        let y = act
            .apply(&y.reshape(tdims)?.transpose(0, 1)?.contiguous()?)?
            .to_dtype(x.dtype())?;
        Ok((y, mean.flatten_all()?, var.flatten_all()?))
    }

    fn forward_eval(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        let mut shape = vec![1; x.rank()];
        shape[1] = x.dim(1)?;
        let dtype = x.dtype();
        let internal = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let get = |t: &Tensor| t.to_dtype(internal)?.reshape(shape.as_slice());
        let scale =
            (get(&self.weight)? / (get(self.running_var.as_tensor())? + self.eps)?.sqrt()?)?;
        let shift = (get(&self.bias)? - (get(self.running_mean.as_tensor())? * &scale)?)?;
        let y = x
            .to_dtype(internal)?
            .broadcast_mul(&scale)?
            .broadcast_add(&shift)?;
        act.apply(&y)?.to_dtype(dtype)
    }
}

/// Batch statistics of one channel.
#[derive(Debug, Clone, Copy, Default)]
struct ChannelStats {
    mean: f32,
    /// Biased (population) variance.
    var: f32,
    rstd: f32,
}

struct BatchNormOp {
    eps: f32,
    /// Negative-input slope of the fused activation (1: none).
    slope: f32,
    /// Per channel, from the forward pass: for the running statistics and
    /// for backward.
    stats: Arc<Mutex<Vec<ChannelStats>>>,
}

/// `(n, c, s)` of a `[N, C, *]` layout.
fn ncs(l: &Layout) -> (usize, usize, usize) {
    let d = l.dims();
    (d[0], d[1], d[2..].iter().product())
}

const OP: &str = "batch norm";

/// Work below this many elements is not worth a thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "ensueno-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, s) = ncs(l1);
        let x = super::contiguous_f32(s1, l1, OP, "input")?;
        let w = super::shaped_f32(s2, l2, Some(&[c]), OP, "weight")?;
        let b = super::shaped_f32(s3, l3, Some(&[c]), OP, "bias")?;
        let mut out = vec![0f32; x.len()];
        let mut stats = vec![ChannelStats::default(); c];
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let stats_ptr = SyncPtr(stats.as_mut_ptr());
        par_for(c, x.len() >= PAR_MIN_ELEMS, |ci| {
            let seg = |ni: usize| &x[(ni * c + ci) * s..][..s];
            let m = (n * s) as f64;
            let mean = ((0..n).map(|ni| sum_lanes(seg(ni))).sum::<f64>() / m) as f32;
            let var = (0..n)
                .map(|ni| sum_sq_dev_lanes(seg(ni), mean))
                .sum::<f64>()
                / m;
            let rstd = (1.0 / (var + self.eps as f64).sqrt()) as f32;
            let a = rstd * w[ci];
            let shift = b[ci] - mean * a;
            for ni in 0..n {
                // SAFETY: channel ci's segments of the output belong to this
                // task only.
                let os = unsafe { out_ptr.slice((ni * c + ci) * s, s) };
                bn_affine_act(seg(ni), os, a, shift, self.slope);
            }
            // SAFETY: slot ci belongs to this task.
            unsafe {
                stats_ptr.slice(ci, 1)[0] = ChannelStats {
                    mean,
                    var: var as f32,
                    rstd,
                }
            };
        });
        if let Ok(mut saved) = self.stats.lock() {
            *saved = stats;
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(bs), Storage::Cpu(gs)) =
            (&*xs, &*ws, &*bs, &*gs)
        else {
            candle_core::bail!("batch norm backward: expected CPU tensors");
        };
        let (n, c, s) = ncs(xl);
        let xv = super::contiguous_f32(xs, xl, OP, "input")?;
        let w = super::shaped_f32(ws, wl, Some(&[c]), OP, "weight")?;
        let b = super::shaped_f32(bs, bl, Some(&[c]), OP, "bias")?;
        let dy = super::shaped_f32(gs, gl, Some(xl.dims()), OP, "gradient")?;
        let saved = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        if saved.len() != c {
            candle_core::bail!("{OP} backward: no statistics from the forward pass");
        }
        let mut dx = vec![0f32; xv.len()];
        let mut dw = vec![0f32; c];
        let mut db = vec![0f32; c];
        let (dx_ptr, dw_ptr, db_ptr) = (
            SyncPtr(dx.as_mut_ptr()),
            SyncPtr(dw.as_mut_ptr()),
            SyncPtr(db.as_mut_ptr()),
        );
        par_for(c, xv.len() >= PAR_MIN_ELEMS, |ci| {
            let st = saved[ci];
            let a = st.rstd * w[ci];
            let p = BnChannel {
                mean: st.mean,
                rstd: st.rstd,
                a,
                shift: b[ci] - st.mean * a,
                slope: self.slope,
            };
            let at = |ni: usize| (ni * c + ci) * s;
            // dβ = Σ g and dγ = Σ g x̂, g the gradient before the activation.
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for ni in 0..n {
                let (g, gx) = bn_grad_sums(&xv[at(ni)..][..s], &dy[at(ni)..][..s], p);
                sum_g += g;
                sum_gx += gx;
            }
            let m = (n * s) as f64;
            let (k_g, k_gx) = ((sum_g / m) as f32, (sum_gx / m) as f32);
            for ni in 0..n {
                // SAFETY: channel ci's segments of dx belong to this task.
                let out = unsafe { dx_ptr.slice(at(ni), s) };
                bn_grad_input(&xv[at(ni)..][..s], &dy[at(ni)..][..s], out, p, k_g, k_gx);
            }
            // SAFETY: slot ci of dw and db belongs to this task.
            unsafe {
                dw_ptr.slice(ci, 1)[0] = sum_gx as f32;
                db_ptr.slice(ci, 1)[0] = sum_g as f32;
            }
        });
        let dev = grad.device();
        Ok((
            Some(Tensor::from_vec(dx, xl.shape(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// One channel's constants: `x̂ = (x - mean) rstd`, pre-activation
/// `x a + shift` with `a = γ rstd`, `shift = β - mean a`.
#[derive(Clone, Copy)]
struct BnChannel {
    mean: f32,
    rstd: f32,
    a: f32,
    shift: f32,
    slope: f32,
}

multiversion! {
    fn bn_affine_act(x: &[f32], out: &mut [f32], a: f32, shift: f32, slope: f32) {
        for (o, &v) in out.iter_mut().zip(x) {
            let y = v.mul_add(a, shift);
            *o = if y > 0.0 { y } else { y * slope };
        }
    }
}

multiversion! {
    /// `(Σ g, Σ g x̂)` over one segment, `g = dy · act'(pre)`.
    fn bn_grad_sums(x: &[f32], dy: &[f32], p: BnChannel) -> (f64, f64) {
        let (mut acc_g, mut acc_gx) = ([0f32; 16], [0f32; 16]);
        let (mut it_x, mut it_d) = (x.chunks_exact(16), dy.chunks_exact(16));
        for (xc, dc) in (&mut it_x).zip(&mut it_d) {
            for l in 0..16 {
                let pre = xc[l].mul_add(p.a, p.shift);
                let g = if pre > 0.0 { dc[l] } else { dc[l] * p.slope };
                acc_g[l] += g;
                acc_gx[l] = g.mul_add((xc[l] - p.mean) * p.rstd, acc_gx[l]);
            }
        }
        let (mut sg, mut sgx) = (0f64, 0f64);
        for (&v, &d) in it_x.remainder().iter().zip(it_d.remainder()) {
            let pre = v.mul_add(p.a, p.shift);
            let g = if pre > 0.0 { d } else { d * p.slope };
            sg += g as f64;
            sgx += (g * (v - p.mean) * p.rstd) as f64;
        }
        sg += acc_g.iter().map(|&v| v as f64).sum::<f64>();
        sgx += acc_gx.iter().map(|&v| v as f64).sum::<f64>();
        (sg, sgx)
    }
}

multiversion! {
    /// `dx = γ rstd (g - mean(g) - x̂ mean(g x̂))` over one segment.
    fn bn_grad_input(x: &[f32], dy: &[f32], out: &mut [f32], p: BnChannel, k_g: f32, k_gx: f32) {
        for ((o, &v), &d) in out.iter_mut().zip(x).zip(dy) {
            let pre = v.mul_add(p.a, p.shift);
            let g = if pre > 0.0 { d } else { d * p.slope };
            let xhat = (v - p.mean) * p.rstd;
            *o = p.a * (g - k_g - xhat * k_gx);
        }
    }
}

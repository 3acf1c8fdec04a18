//! Group normalisation, optionally fused with SiLU, as a candle custom op.
//!
//! Group Normalization (Yuxin Wu, Kaiming He, 2018, arXiv:1803.08494), with
//! PyTorch's `torch.nn.GroupNorm` semantics (biased variance, per-channel
//! affine), as used by every resnet block of diffusers' UNets and VAEs
//! (`diffusers.models.resnet.ResnetBlock2D`: `norm1` then `nonlinearity`).
//!
//! candle's `GroupNorm` is a chain of composite ops, each a full pass over
//! memory in forward and again in backward. Here the CPU f32 path does the
//! statistics (accumulated in f64 per channel, two passes over a group that
//! stays in cache), the affine transform and SiLU in one write of the output,
//! and the backward pass in two sweeps per group. Other dtypes and devices
//! use the composite fallback.
//!
//! This file also holds the small CPU helpers shared by the other kernels of
//! `ops` (SIMD dispatch, a scoped parallel-for, a vectorisable `exp`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Storage, Tensor};
use candle_nn::VarBuilder;

use crate::{Error, Result};

// ---------------------------------------------------------------------------
// CPU helpers shared by the kernels of `ops`.

/// Compiles `fn` three times (AVX-512, AVX2+FMA, baseline) and picks the best
/// version for this CPU at run time, so the autovectoriser can use wide
/// registers without building the whole crate for one CPU.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                match $crate::ops::group_norm::simd_level() {
                    // SAFETY: the CPU features were detected at run time.
                    2 => return unsafe { v4($($arg),*) },
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            inner($($arg),*)
        }
    };
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
            unsafe fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: the caller's contract is `inner`'s.
                    unsafe { inner($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: the caller's contract is `inner`'s.
                    unsafe { inner($($arg),*) }
                }
                match $crate::ops::group_norm::simd_level() {
                    // SAFETY: the CPU features were detected at run time;
                    // the rest of the contract is the caller's.
                    2 => return unsafe { v4($($arg),*) },
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            // SAFETY: forwarded to the caller.
            unsafe { inner($($arg),*) }
        }
    };
}
pub(crate) use multiversion;

/// 2: AVX-512F, 1: AVX2 + FMA, 0: neither.
pub(crate) fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if v3 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                return 2;
            }
            if v3 {
                return 1;
            }
        }
        0
    })
}

/// A raw pointer that parallel tasks use to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: users only write disjoint ranges from different threads.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// # Safety
    /// `start..start + len` must lie in the buffer and not be accessed by any
    /// other task at the same time.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Runs `f(0..n_tasks)` on candle's CPU thread pool (its workers and the
/// calling thread pulling task indices from a shared counter), or inline
/// when `parallel` is false. The pool is the one candle's own ops and the
/// convolutions use: spawning threads here instead would leave its idle
/// workers spin-waiting beside them, more runnable threads than cores.
pub(crate) fn par_for(n_tasks: usize, parallel: bool, f: impl Fn(usize) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    if !parallel || n_tasks <= 1 || pool.n_workers() == 0 {
        (0..n_tasks).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    pool.execute(|_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n_tasks {
            break;
        }
        f(i);
    });
}

/// `exp(x)` to about 2 ulp for f32, written so that loops over it vectorise
/// (Cody-Waite range reduction and a degree-6 polynomial).
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p: f32 = 1.0 / 720.0;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // SAFETY: n is an integer in [-126, 127] after the clamp.
    let e = unsafe { n.to_int_unchecked::<i32>() };
    p * f32::from_bits(((e + 127) as u32) << 23)
}

// ---------------------------------------------------------------------------

/// PyTorch's `GroupNorm(num_groups, channels, eps)` (affine), with an
/// optional fused SiLU. Weights load from the `weight` and `bias` keys, like
/// `candle_nn::group_norm`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        check_groups(num_groups, channels)?;
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// `silu(group_norm(x))` in one pass.
    ///
    /// # Shapes
    /// `x`: `[N, C, *]` (any trailing dims) -> same shape.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, self.num_groups, &self.weight, &self.bias, self.eps, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        group_norm(
            x,
            self.num_groups,
            &self.weight,
            &self.bias,
            self.eps,
            false,
        )
        .map_err(candle_core::Error::wrap)
    }
}

fn check_groups(num_groups: usize, channels: usize) -> Result<()> {
    if num_groups == 0 || !channels.is_multiple_of(num_groups) {
        return Err(Error::invalid(format!(
            "group norm: {channels} channels cannot be split into {num_groups} groups"
        )));
    }
    Ok(())
}

/// PyTorch's GroupNorm of `x` (`[N, C, *]`) with `num_groups` groups and
/// per-channel `weight`/`bias` (`[C]`), followed by SiLU when `silu`.
///
/// f32 CPU tensors take the fused kernel (forward and backward); everything
/// else the composite implementation (statistics in f32, result cast back to
/// the input dtype).
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        return Err(Error::Shape {
            what: "group norm input".into(),
            expected: "[N, C, *]".into(),
            got: format!("{dims:?}"),
        });
    }
    let channels = dims[1];
    check_groups(num_groups, channels)?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [channels] {
            return Err(Error::Shape {
                what: format!("group norm {name}"),
                expected: format!("[{channels}]"),
                got: format!("{:?}", t.dims()),
            });
        }
    }
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.dtype() == DType::F32;
    if fast {
        let op = GroupNormOp {
            num_groups,
            eps: eps as f32,
            silu,
            stats: Mutex::new(Vec::new()),
        };
        Ok(x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
    } else {
        Ok(group_norm_composite(
            x, num_groups, weight, bias, eps, silu,
        )?)
    }
}

/// The reference implementation from basic candle ops (differentiable on any
/// device and dtype).
pub fn group_norm_composite(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let xg = x.to_dtype(internal)?.reshape((dims[0], num_groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let xn = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut wdims = vec![1; dims.len()];
    wdims[1] = dims[1];
    let w = weight.to_dtype(internal)?.reshape(wdims.as_slice())?;
    let b = bias.to_dtype(internal)?.reshape(wdims.as_slice())?;
    let y = xn.broadcast_mul(&w)?.broadcast_add(&b)?;
    let y = if silu { y.silu()? } else { y };
    y.to_dtype(dtype)
}

struct GroupNormOp {
    num_groups: usize,
    eps: f32,
    silu: bool,
    /// (mean, rstd) per (n, group), kept from the forward pass for backward.
    stats: Mutex<Vec<(f32, f32)>>,
}

fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// Work below this many elements is not worth a thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ensueno-group-norm"
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
        let x = cpu_slice(s1, l1, "group norm input")?;
        let w = cpu_slice(s2, l2, "group norm weight")?;
        let b = cpu_slice(s3, l3, "group norm bias")?;
        let dims = l1.dims();
        let (n, c) = (dims[0], dims[1]);
        let g = self.num_groups;
        let cpg = c / g;
        let s: usize = dims[2..].iter().product();
        let group_len = cpg * s;
        // SAFETY: the n * g tasks write their groups, which tile `out`.
        let mut out = unsafe { crate::ops::uninit_f32(x.len()) };
        let mut stats = vec![(0f32, 0f32); n * g];
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let stats_ptr = SyncPtr(stats.as_mut_ptr());
        par_for(n * g, x.len() >= PAR_MIN_ELEMS, |task| {
            let ch = (task % g) * cpg;
            let xs = &x[task * group_len..(task + 1) * group_len];
            // SAFETY: each task writes its own group of the output and its own stats slot.
            let os = unsafe { out_ptr.slice(task * group_len, group_len) };
            let st = gn_forward_group(
                xs,
                os,
                &w[ch..ch + cpg],
                &b[ch..ch + cpg],
                s,
                self.eps,
                self.silu,
            );
            unsafe { stats_ptr.slice(task, 1)[0] = st };
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
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let g = self.num_groups;
        let cpg = c / g;
        let s: usize = dims[2..].iter().product();
        let group_len = cpg * s;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(bs), Storage::Cpu(gs)) =
            (&*xs, &*ws, &*bs, &*gs)
        else {
            candle_core::bail!("group norm backward: expected CPU tensors");
        };
        let x = cpu_slice(xs, xl, "group norm input")?;
        let w = cpu_slice(ws, wl, "group norm weight")?;
        let b = cpu_slice(bs, bl, "group norm bias")?;
        let dout = cpu_slice(gs, gl, "group norm gradient")?;
        let saved = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        // SAFETY: the n * g tasks write their groups, which tile `dx`.
        let mut dx = unsafe { crate::ops::uninit_f32(x.len()) };
        // Per-(n, channel) partial sums for the weight and bias gradients.
        let mut dw_part = vec![0f64; n * c];
        let mut db_part = vec![0f64; n * c];
        let dx_ptr = SyncPtr(dx.as_mut_ptr());
        let dw_ptr = SyncPtr(dw_part.as_mut_ptr());
        let db_ptr = SyncPtr(db_part.as_mut_ptr());
        par_for(n * g, x.len() >= PAR_MIN_ELEMS, |task| {
            let ch = (task % g) * cpg;
            let xs = &x[task * group_len..(task + 1) * group_len];
            let (mean, rstd) = match saved.get(task) {
                Some(st) => *st,
                None => group_stats(xs, self.eps),
            };
            // SAFETY: each task owns its group of dx and its channels' partial sums.
            let (dxs, dws, dbs) = unsafe {
                (
                    dx_ptr.slice(task * group_len, group_len),
                    dw_ptr.slice(task * cpg, cpg),
                    db_ptr.slice(task * cpg, cpg),
                )
            };
            gn_backward_group(
                GroupBwd {
                    x: xs,
                    dout: &dout[task * group_len..(task + 1) * group_len],
                    w: &w[ch..ch + cpg],
                    b: &b[ch..ch + cpg],
                    s,
                    mean,
                    rstd,
                    silu: self.silu,
                },
                dxs,
                dws,
                dbs,
            );
        });
        let mut dw = vec![0f32; c];
        let mut db = vec![0f32; c];
        for ci in 0..c {
            dw[ci] = (0..n).map(|ni| dw_part[ni * c + ci]).sum::<f64>() as f32;
            db[ci] = (0..n).map(|ni| db_part[ni * c + ci]).sum::<f64>() as f32;
        }
        let dev = grad.device();
        let dx = Tensor::from_vec(dx, dims, dev)?;
        let dw = Tensor::from_vec(dw, c, dev)?;
        let db = Tensor::from_vec(db, c, dev)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Mean and 1/sqrt(var + eps) of one group: two passes, f64 accumulation.
fn group_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let mean = (sum_lanes(x) / x.len().max(1) as f64) as f32;
    let var = sum_sq_dev_lanes(x, mean) / x.len().max(1) as f64;
    (mean, (1.0 / (var + eps as f64).sqrt()) as f32)
}

multiversion! {
    pub(crate) fn sum_lanes(x: &[f32]) -> f64 {
        // f32 lanes keep the loop vectorised; flushing to f64 every 4096
        // elements bounds the rounding error of large groups.
        let mut total = 0f64;
        for block in x.chunks(4096) {
            let mut acc = [0f32; 16];
            let mut it = block.chunks_exact(16);
            for ch in &mut it {
                for l in 0..16 {
                    acc[l] += ch[l];
                }
            }
            let mut t = it.remainder().iter().map(|&v| v as f64).sum::<f64>();
            t += acc.iter().map(|&v| v as f64).sum::<f64>();
            total += t;
        }
        total
    }
}

multiversion! {
    pub(crate) fn sum_sq_dev_lanes(x: &[f32], mean: f32) -> f64 {
        let mut total = 0f64;
        for block in x.chunks(4096) {
            let mut acc = [0f32; 16];
            let mut it = block.chunks_exact(16);
            for ch in &mut it {
                for l in 0..16 {
                    let d = ch[l] - mean;
                    acc[l] = d.mul_add(d, acc[l]);
                }
            }
            let mut t = it
                .remainder()
                .iter()
                .map(|&v| ((v - mean) as f64).powi(2))
                .sum::<f64>();
            t += acc.iter().map(|&v| v as f64).sum::<f64>();
            total += t;
        }
        total
    }
}

multiversion! {
    fn gn_forward_group(
        x: &[f32],
        out: &mut [f32],
        w: &[f32],
        b: &[f32],
        s: usize,
        eps: f32,
        silu: bool,
    ) -> (f32, f32) {
        let (mean, rstd) = group_stats(x, eps);
        for ci in 0..w.len() {
            let a = rstd * w[ci];
            let c = b[ci] - mean * a;
            let xs = &x[ci * s..(ci + 1) * s];
            let os = &mut out[ci * s..(ci + 1) * s];
            if silu {
                for (o, &v) in os.iter_mut().zip(xs) {
                    let y = v.mul_add(a, c);
                    *o = y / (1.0 + exp_approx(-y));
                }
            } else {
                for (o, &v) in os.iter_mut().zip(xs) {
                    *o = v.mul_add(a, c);
                }
            }
        }
        (mean, rstd)
    }
}

struct GroupBwd<'a> {
    x: &'a [f32],
    dout: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    s: usize,
    mean: f32,
    rstd: f32,
    silu: bool,
}

multiversion! {
    fn gn_backward_group(p: GroupBwd<'_>, dx: &mut [f32], dw: &mut [f64], db: &mut [f64]) {
        let GroupBwd { x, dout, w, b, s, mean, rstd, silu } = p;
        // Sweep 1: dy (the gradient before SiLU) into dx, per-channel sums of
        // dy and dy * (x - mean).
        let mut sum_wdy = 0f64;
        let mut sum_wdy_xhat = 0f64;
        for ci in 0..w.len() {
            let a = rstd * w[ci];
            let c = b[ci] - mean * a;
            let xs = &x[ci * s..(ci + 1) * s];
            let gs = &dout[ci * s..(ci + 1) * s];
            let ds = &mut dx[ci * s..(ci + 1) * s];
            if silu {
                for ((d, &v), &g) in ds.iter_mut().zip(xs).zip(gs) {
                    let y = v.mul_add(a, c);
                    let sg = 1.0 / (1.0 + exp_approx(-y));
                    *d = g * sg * (1.0 + y * (1.0 - sg));
                }
            } else {
                ds.copy_from_slice(gs);
            }
            let mut acc_dy = [0f32; 16];
            let mut acc_dyx = [0f32; 16];
            let mut ci_dy = 0f64;
            let mut ci_dyx = 0f64;
            for (xb, db_) in xs.chunks(4096).zip(ds.chunks(4096)) {
                let mut xi = xb.chunks_exact(16);
                let mut di = db_.chunks_exact(16);
                for (xc, dc) in (&mut xi).zip(&mut di) {
                    for l in 0..16 {
                        acc_dy[l] += dc[l];
                        acc_dyx[l] = dc[l].mul_add(xc[l] - mean, acc_dyx[l]);
                    }
                }
                for (&xv, &dv) in xi.remainder().iter().zip(di.remainder()) {
                    ci_dy += dv as f64;
                    ci_dyx += dv as f64 * (xv - mean) as f64;
                }
                ci_dy += acc_dy.iter().map(|&v| v as f64).sum::<f64>();
                ci_dyx += acc_dyx.iter().map(|&v| v as f64).sum::<f64>();
                acc_dy = [0f32; 16];
                acc_dyx = [0f32; 16];
            }
            let dwc = ci_dyx * rstd as f64;
            db[ci] = ci_dy;
            dw[ci] = dwc;
            sum_wdy += w[ci] as f64 * ci_dy;
            sum_wdy_xhat += w[ci] as f64 * dwc;
        }
        // Sweep 2: dx = rstd * (dy * w - mean(dy * w) - xhat * mean(dy * w * xhat)).
        let m = x.len().max(1) as f64;
        let (mean64, rstd64) = (mean as f64, rstd as f64);
        let ma = sum_wdy / m;
        let mb = sum_wdy_xhat / m;
        let k2 = (-rstd64 * rstd64 * mb) as f32;
        let k3 = (rstd64 * (mean64 * rstd64 * mb - ma)) as f32;
        for ci in 0..w.len() {
            let k1 = rstd * w[ci];
            let xs = &x[ci * s..(ci + 1) * s];
            let ds = &mut dx[ci * s..(ci + 1) * s];
            for (d, &v) in ds.iter_mut().zip(xs) {
                *d = d.mul_add(k1, v.mul_add(k2, k3));
            }
        }
    }
}

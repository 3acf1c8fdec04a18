//! Per-channel (or per-sample-and-channel) bias add on `[N, C, ...]`
//! tensors, as a candle custom op with a fused backward.
//!
//! candle's `broadcast_add` of a `[1, C, 1, 1]` bias is fine forward, but its
//! backward reduces the output gradient over dims (0, 2, 3) with a
//! single-threaded strided `sum`, which took a sixth of a DDPM train step.
//! Here the bias gradient is one contiguous, vectorised, parallel pass over
//! the `H * W` planes. f32 on the CPU only; anything else falls back to
//! `broadcast_add`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

use super::group_norm::SyncPtr;
use crate::{Error, Result};

/// Below this many elements the work runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// Splits `out` (whole planes of `plane` elements) into one contiguous run of
/// planes per thread of candle's pool and calls `f(first_plane, run)` on
/// each; on the calling thread alone when `work` (elements touched) is
/// small.
fn par_planes(out: &mut [f32], plane: usize, work: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    // The last run may end in a partial plane.
    let planes = out.len().div_ceil(plane.max(1));
    let pool = candle_core::utils::barrier_pool();
    let threads = (pool.n_workers() + 1).clamp(1, planes.max(1));
    if work < PAR_MIN || threads <= 1 || plane == 0 {
        f(0, out);
        return;
    }
    let per = planes.div_ceil(threads);
    let len = out.len();
    let ptr = SyncPtr(out.as_mut_ptr());
    pool.execute(|tid| {
        let first = tid * per;
        if first >= planes {
            return;
        }
        let start = first * plane;
        let end = ((first + per) * plane).min(len);
        // SAFETY: thread `tid` gets planes first .. first + per only; the
        // runs of different threads are disjoint and inside `out`.
        let run = unsafe { ptr.slice(start, end - start) };
        f(first, run);
    });
}

/// Sum of a slice with 16 independent accumulators (vectorises).
#[inline]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::contiguous_f32(s, l, "plane bias", what)
}

/// Adds `b[p % b.len()]` to every plane `p` of `hw` elements of `y`, in
/// place (the conv op's fused bias).
pub(crate) fn add_channel_bias_inplace(y: &mut [f32], hw: usize, b: &[f32]) {
    let c = b.len().max(1);
    let work = y.len();
    par_planes(y, hw, work, |p0, run| {
        for (i, plane) in run.chunks_exact_mut(hw.max(1)).enumerate() {
            let bv = b[(p0 + i) % c];
            for v in plane.iter_mut() {
                *v += bv;
            }
        }
    });
}

/// `y += r`, elementwise, in parallel chunks.
pub(crate) fn add_inplace(y: &mut [f32], r: &[f32]) {
    let chunk = 1 << 14;
    let work = y.len();
    par_planes(y, chunk.min(r.len().max(1)), work, |p0, run| {
        let start = p0 * chunk.min(r.len().max(1));
        for (a, b) in run.iter_mut().zip(&r[start..]) {
            *a += *b;
        }
    });
}

/// `db[c] = sum_{n, ..} dy[n, c, ..]` (or `db[n, c] = sum_{..} dy[n, c, ..]`
/// when `per_sample`) for a contiguous f32 CPU `dy` `[N, C, ...]`: the
/// gradient of a per-channel (per-sample-and-channel) bias.
pub(crate) fn plane_bias_grad(dy: &Tensor, per_sample: bool) -> candle_core::Result<Tensor> {
    dy.contiguous()?.apply_op1_no_bwd(&PlaneSum { per_sample })
}

/// `y[n, c, ..] = x[n, c, ..] + b[c]` (or `b[n, c]` when `per_sample`).
struct AddPlaneBias {
    per_sample: bool,
}

/// `db[c] = sum_{n, ..} dy[n, c, ..]` (or `db[n, c] = sum_{..} dy[n, c, ..]`).
struct PlaneSum {
    per_sample: bool,
}

impl CustomOp2 for AddPlaneBias {
    fn name(&self) -> &'static str {
        "ensueno-add-plane-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "input")?;
        let b = contiguous_f32(s2, l2, "bias")?;
        let dims = l1.dims();
        let (n, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let per_sample = self.per_sample;
        if b.len() != if per_sample { n * c } else { c } {
            candle_core::bail!("plane bias: bias has {} elements", b.len())
        }
        let mut out = vec![0f32; x.len()];
        let work = out.len();
        par_planes(&mut out, hw, work, |p0, run| {
            for (i, (o, xi)) in run
                .chunks_exact_mut(hw)
                .zip(x[p0 * hw..].chunks_exact(hw))
                .enumerate()
            {
                let p = p0 + i;
                let bv = if per_sample { b[p] } else { b[p % c] };
                for (o, v) in o.iter_mut().zip(xi) {
                    *o = *v + bv;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let db = grad
            .apply_op1_no_bwd(&PlaneSum {
                per_sample: self.per_sample,
            })?
            .reshape(b.shape())?;
        Ok((Some(grad), Some(db)))
    }
}

impl CustomOp1 for PlaneSum {
    fn name(&self) -> &'static str {
        "ensueno-plane-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = contiguous_f32(s, l, "gradient")?;
        let dims = l.dims();
        let (n, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let mut sums = vec![0f32; n * c];
        par_planes(&mut sums, 1, dy.len(), |first, run| {
            let src = &dy[first * hw..];
            for (s, p) in run.iter_mut().zip(src.chunks_exact(hw.max(1))) {
                *s = sum_lanes(p);
            }
        });
        if self.per_sample {
            return Ok((CpuStorage::F32(sums), Shape::from((n, c))));
        }
        let mut out = vec![0f32; c];
        for row in sums.chunks_exact(c.max(1)) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += *v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

/// `x + b` with `b` broadcast over every dim of `x` but the channels (and
/// the batch, when `b` is `[N, C]`).
///
/// # Shapes
/// - `x`: `[N, C, ...]` (at least 2 dims)
/// - `b`: `[C]` or `[N, C]`
/// - returns the shape of `x`
///
/// f32 tensors on the CPU take the fused path; anything else goes through
/// `broadcast_add`.
pub fn add_plane_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        return Err(Error::Shape {
            what: "plane bias input".into(),
            expected: "[N, C, ...]".into(),
            got: format!("{dims:?}"),
        });
    }
    let (n, c) = (dims[0], dims[1]);
    let per_sample = match b.dims() {
        [bc] if *bc == c => false,
        [bn, bc] if *bn == n && *bc == c => true,
        other => {
            return Err(Error::Shape {
                what: "plane bias".into(),
                expected: format!("[{c}] or [{n}, {c}]"),
                got: format!("{other:?}"),
            })
        }
    };
    let fast =
        matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && b.dtype() == DType::F32;
    if fast {
        return Ok(x
            .contiguous()?
            .apply_op2(&b.contiguous()?, AddPlaneBias { per_sample })?);
    }
    let mut shape = vec![1usize; dims.len()];
    shape[1] = c;
    if per_sample {
        shape[0] = n;
    }
    Ok(x.broadcast_add(&b.reshape(shape)?)?)
}

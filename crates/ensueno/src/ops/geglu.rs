//! The GEGLU activation, `h * gelu(gate)` with `[h, gate]` the two halves
//! of the last dimension, fused forward and backward, as a candle custom op.
//!
//! Paper: Noam Shazeer, "GLU Variants Improve Transformer", 2020,
//! arXiv:2002.05202. Reference implementation: diffusers'
//! `models/activations.py` (`GEGLU`, exact erf GELU), used by the
//! feed-forward of every transformer block of a Stable Diffusion UNet.
//!
//! candle's composite (two narrows, `gelu_erf`, a product) runs each step as
//! a single-threaded pass, and the backward of `gelu_erf` alone is a dozen
//! more. Here each direction is one parallel pass over the rows, vectorised:
//! erf is Abramowitz & Stegun's 7.1.26 approximation (absolute error 1.5e-7
//! in exact arithmetic, at most 5e-7 in f32 against libm, tested) with a
//! polynomial `exp`,
//! where candle's `gelu_erf` calls libm's scalar `erff` per element. f32 on
//! the CPU; other dtypes and devices use the composite.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

use super::group_norm::{exp_approx, multiversion, par_for, SyncPtr};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Below this many input elements the work runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// `erf(x)` by Abramowitz & Stegun, Handbook of Mathematical Functions,
/// 7.1.26 (|error| <= 1.5e-7, 5e-7 after f32 rounding), written so that
/// loops over it vectorise.
#[inline(always)]
fn erf_approx(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = t * t.mul_add(
        t.mul_add(
            t.mul_add(t.mul_add(1.061_405_4, -1.453_152), 1.421_413_8),
            -0.284_496_72,
        ),
        0.254_829_6,
    );
    (1.0 - poly * exp_approx(-a * a)).copysign(x)
}

/// `Φ(g) = (1 + erf(g / √2)) / 2`, the standard normal CDF.
#[inline(always)]
fn normal_cdf(g: f32) -> f32 {
    (erf_approx(g * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5
}

// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

multiversion! {
    /// One row: `y = h gelu(g)`.
    fn geglu_row(h: &[f32], gate: &[f32], y: &mut [f32]) {
        for ((y, &h), &g) in y.iter_mut().zip(h).zip(gate) {
            *y = h * (normal_cdf(g) * g);
        }
    }
}

multiversion! {
    /// One row of the gradient: `dh = dy gelu(g)`, `dg = dy h gelu'(g)`.
    fn geglu_grad_row(h: &[f32], gate: &[f32], dy: &[f32], dh: &mut [f32], dg: &mut [f32]) {
        for j in 0..dy.len().min(h.len()).min(gate.len()).min(dh.len()).min(dg.len()) {
            let (hv, g, dyv) = (h[j], gate[j], dy[j]);
            let cdf = normal_cdf(g);
            dh[j] = dyv * cdf * g;
            dg[j] = dyv * hv * (cdf + g * INV_SQRT_2PI * exp_approx(-0.5 * g * g));
        }
    }
}

/// `h * gelu(gate)` for `x = [h, gate]` along the last dimension.
///
/// # Shapes
/// - `x`: `[..., 2 * D]`
/// - returns `[..., D]`
pub fn geglu(x: &Tensor) -> candle_core::Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if width % 2 != 0 {
        bail!("geglu: last dimension {width} is odd")
    }
    let half = width / 2;
    if half > 0 && x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(GegluOp { half });
    }
    let hidden = x.narrow(D::Minus1, 0, half)?;
    let gate = x.narrow(D::Minus1, half, half)?;
    hidden * gate.gelu_erf()?
}

struct GegluOp {
    half: usize,
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::contiguous_f32(s, l, "geglu", what)
}

/// Calls `f(first_row, rows)` for blocks of rows of `rows` total, in
/// parallel when the input has `work` elements or more.
fn for_row_blocks(rows: usize, work: usize, f: impl Fn(usize, usize) + Sync) {
    par_for(rows.div_ceil(ROWS_PER_TASK), work >= PAR_MIN, |t| {
        let r0 = t * ROWS_PER_TASK;
        f(r0, ROWS_PER_TASK.min(rows - r0));
    });
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "ensueno-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "input")?;
        let d = self.half;
        let rows = x.len() / (2 * d).max(1);
        let mut out = vec![0f32; rows * d];
        let dst = SyncPtr(out.as_mut_ptr());
        for_row_blocks(rows, x.len(), |r0, n| {
            // SAFETY: output rows r0 .. r0 + n belong to this task only.
            let y = unsafe { dst.slice(r0 * d, n * d) };
            for (yr, xr) in y
                .chunks_exact_mut(d)
                .zip(x[r0 * 2 * d..].chunks_exact(2 * d))
            {
                let (h, gate) = xr.split_at(d);
                geglu_row(h, gate, yr);
            }
        });
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = d;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(
            grad.apply_op2_no_bwd(x, &GegluGradOp { half: self.half })?,
        ))
    }
}

/// `(dy, x) -> dx` of [`GegluOp`]: `d/dh = dy gelu(g)`,
/// `d/dg = dy h gelu'(g)` with `gelu'(g) = Φ(g) + g φ(g)`.
struct GegluGradOp {
    half: usize,
}

impl CustomOp2 for GegluGradOp {
    fn name(&self) -> &'static str {
        "ensueno-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = contiguous_f32(s1, l1, "output gradient")?;
        let x = contiguous_f32(s2, l2, "input")?;
        let d = self.half;
        let rows = x.len() / (2 * d).max(1);
        if dy.len() != rows * d {
            bail!(
                "geglu: gradient has {} elements, expected {}",
                dy.len(),
                rows * d
            )
        }
        let mut dx = vec![0f32; x.len()];
        let dst = SyncPtr(dx.as_mut_ptr());
        for_row_blocks(rows, x.len(), |r0, n| {
            // SAFETY: gradient rows r0 .. r0 + n belong to this task only.
            let out = unsafe { dst.slice(r0 * 2 * d, n * 2 * d) };
            let src = x[r0 * 2 * d..].chunks_exact(2 * d);
            for ((o, xr), gr) in out
                .chunks_exact_mut(2 * d)
                .zip(src)
                .zip(dy[r0 * d..].chunks_exact(d))
            {
                let (h, gate) = xr.split_at(d);
                let (dh, dg) = o.split_at_mut(d);
                geglu_grad_row(h, gate, gr, dh, dg);
            }
        });
        Ok((CpuStorage::F32(dx), l2.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composite(x: &Tensor) -> candle_core::Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let hidden = x.narrow(D::Minus1, 0, half)?;
        let gate = x.narrow(D::Minus1, half, half)?;
        hidden * gate.gelu_erf()?
    }

    /// The erf approximation against libm's `erff` (candle's) on a fine
    /// grid over [-6, 6]: A&S's 1.5e-7 plus f32 rounding of the polynomial
    /// and `exp` (4.8e-7 measured, 8 ulp of values near 1).
    #[test]
    fn erf_matches_libm() {
        let worst = (-60_000..=60_000)
            .map(|i| i as f32 * 1e-4)
            .map(|x| (erf_approx(x) - candle_core::cpu::erf::erf_f32(x)).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 5e-7, "erf differs by {worst}");
        assert_eq!(erf_approx(f32::INFINITY), 1.0);
        assert_eq!(erf_approx(f32::NEG_INFINITY), -1.0);
    }

    /// Values and gradients against candle's composite (narrow, gelu_erf,
    /// product): a small input (one task) and one split over many row
    /// blocks, odd widths; an odd last dimension is an error.
    #[test]
    fn matches_composite() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dims in [(2, 3, 10), (5, 301, 66)] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 1., dims, &dev)? * 2.)?)?;
            let ours = geglu(x.as_tensor())?;
            let theirs = composite(x.as_tensor())?;
            let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                d <= 1e-6 * scale,
                "{dims:?}: forward differs by {d} (scale {scale})"
            );
            let r = Tensor::randn(0f32, 1., ours.dims(), &dev)?;
            let g1 = (&ours * &r)?.sum_all()?.backward()?;
            let g2 = (&theirs * &r)?.sum_all()?.backward()?;
            let a = g1.get(x.as_tensor()).expect("gradient");
            let b = g2.get(x.as_tensor()).expect("gradient");
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                d <= 1e-5 * scale,
                "{dims:?}: gradient differs by {d} (scale {scale})"
            );
        }
        assert!(geglu(&Tensor::zeros((2, 5), DType::F32, &dev)?).is_err());
        assert_eq!(
            geglu(&Tensor::zeros((2, 0), DType::F32, &dev)?)?.dims(),
            [2, 0]
        );
        Ok(())
    }
}

//! A fully connected layer (PyTorch's `torch.nn.Linear`, `y = x W^T + b`)
//! that runs as one matrix product whatever the rank of its input.
//!
//! candle-nn's `Linear` multiplies a `[B, T, in]` input by the weight
//! broadcast to `[B, in, out]`: B small products forward and, in the
//! backward pass, a `[B, in, out]` gradient summed over B. For the many
//! short token sequences of a small UNet's transformer blocks that costs
//! several times the arithmetic. Flattening the leading dimensions first
//! gives one `[B*T, in] x [in, out]` product both ways; the weights and
//! their names (`weight`, `bias`) are unchanged.
//!
//! On the CPU in f32 the product (and its two gradients) is a custom op
//! whose GEMMs are split into row blocks over candle's thread pool, the one
//! every other kernel here runs on. candle's matmul runs its GEMM on rayon's
//! pool instead, and while it does, candle's pool workers spin-wait for the
//! next op: on 2 cores that left one core spinning through every product
//! of the text-to-image UNet's transformer blocks.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use super::conv::{for_each_unit, SharedMut};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// A `Linear(in_dim, out_dim)` under `vb`, initialised as candle-nn's
/// (and PyTorch's) default, with or without a bias.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let l = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// A `Linear(in_dim, out_dim)` with a bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = match dims.split_last() {
            Some((&last, lead)) if !lead.is_empty() => (last, lead),
            _ => candle_core::bail!("Linear: input of rank {} (expected >= 2)", dims.len()),
        };
        let rows: usize = lead.iter().product();
        let flat = x.contiguous()?.reshape((rows, last))?;
        let y = matmul_t(&flat, &self.weight)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.weight.dim(0)?);
        y.reshape(out_dims)
    }
}

/// `x W^T` for `x [M, K]` and `W [N, K]`: [`MatmulOp`] for contiguous f32
/// tensors on the CPU, candle's matmul otherwise.
fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let fast = x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && w.is_contiguous();
    if !fast {
        return x.matmul(&w.t()?);
    }
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        bail!("Linear: input has {k} features, the weight expects {k2}")
    }
    x.apply_op2(
        w,
        MatmulOp {
            m,
            n,
            k,
            product: Product::Forward,
        },
    )
}

/// The three products of `y = x W^T` (`x [M, K]`, `W [N, K]`, `y [M, N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    /// `(x, W) -> x W^T`, `[M, N]`.
    Forward,
    /// `(dy, W) -> dy W`, `[M, K]`: the input gradient.
    GradInput,
    /// `(dy, x) -> dy^T x`, `[N, K]`: the weight gradient.
    GradWeight,
}

struct MatmulOp {
    m: usize,
    n: usize,
    k: usize,
    product: Product,
}

/// Output rows per unit: one block of the GEMM kernel's full height, at
/// fixed offsets from row 0. A row's value must not depend on how many
/// rows are multiplied with it (a batch's second image must equal the same
/// image generated alone), and the `gemm` crate computes very short row
/// blocks by another summation order: with blocks of `rows / 8` rows, 16
/// for a batch of one, batch invariance broke.
const ROWS_PER_UNIT: usize = 64;

fn f32_data<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    dims: (usize, usize),
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    super::shaped_f32(s, l, Some(&[dims.0, dims.1]), "linear op", what)
}

impl CustomOp2 for MatmulOp {
    fn name(&self) -> &'static str {
        match self.product {
            Product::Forward => "ensueno-linear",
            Product::GradInput => "ensueno-linear-grad-input",
            Product::GradWeight => "ensueno-linear-grad-weight",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k) = (self.m, self.n, self.k);
        // Output [rows, cols] = lhs [rows, inner] x rhs [inner, cols], each
        // unit a block of output rows; strides are (row, column).
        let (a, b, rows, cols, inner, lhs_s, rhs_s) = match self.product {
            Product::Forward => (
                f32_data(s1, l1, (m, k), "input")?,
                f32_data(s2, l2, (n, k), "weight")?,
                m,
                n,
                k,
                (k, 1),
                (1, k),
            ),
            Product::GradInput => (
                f32_data(s1, l1, (m, n), "output gradient")?,
                f32_data(s2, l2, (n, k), "weight")?,
                m,
                k,
                n,
                (n, 1),
                (k, 1),
            ),
            Product::GradWeight => (
                f32_data(s1, l1, (m, n), "output gradient")?,
                f32_data(s2, l2, (m, k), "input")?,
                n,
                k,
                m,
                (1, n),
                (k, 1),
            ),
        };
        let mut out = vec![0f32; rows * cols];
        let dst = SharedMut(out.as_mut_ptr());
        let per = ROWS_PER_UNIT;
        for_each_unit(rows.div_ceil(per), |_, u, par| {
            let r0 = u * per;
            let r = per.min(rows - r0);
            // SAFETY: unit u writes output rows r0 .. r0 + r only; lhs row
            // r0 starts at r0 * lhs_s.0 and the block lies inside `a`, rhs
            // is all of `b` (shapes checked above).
            unsafe {
                super::sgemm(
                    (r, cols, inner),
                    dst.at(r0 * cols),
                    (cols, 1),
                    false,
                    a.as_ptr().add(r0 * lhs_s.0),
                    lhs_s,
                    b.as_ptr(),
                    rhs_s,
                    1.0,
                    par,
                )
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, cols))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.product != Product::Forward {
            bail!("linear op: no second derivative")
        }
        let grad = grad.contiguous()?;
        let op = |product| MatmulOp {
            m: self.m,
            n: self.n,
            k: self.k,
            product,
        };
        // a = x, b = W, grad = dy.
        let dx = grad.apply_op2_no_bwd(b, &op(Product::GradInput))?;
        let dw = grad.apply_op2_no_bwd(a, &op(Product::GradWeight))?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Same values and gradients as candle-nn's Linear on 3-D inputs: a
    /// tiny one and one split into many row blocks (odd sizes throughout).
    #[test]
    fn matches_candle_linear() -> candle_core::Result<()> {
        check((3, 5, 4), 6)?;
        check((7, 61, 37), 45)
    }

    fn check(x_dims: (usize, usize, usize), out: usize) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., x_dims, &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (out, x_dims.2), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., out, &dev)?)?;
        let ours = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let theirs = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let y1 = ours.forward(x.as_tensor())?;
        let y2 = theirs.forward(x.as_tensor())?;
        let d = (&y1 - &y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "forward differs by {d}");
        let g1 = y1.sqr()?.sum_all()?.backward()?;
        let g2 = y2.sqr()?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let a = g1.get(v.as_tensor()).expect("gradient");
            let c = g2.get(v.as_tensor()).expect("gradient");
            let d = (a - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        Ok(())
    }
}

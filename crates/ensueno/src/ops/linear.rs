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

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

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
        let y = flat.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.weight.dim(0)?);
        y.reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Same values and gradients as candle-nn's Linear on a 3-D input.
    #[test]
    fn matches_candle_linear() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5, 4), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (6, 4), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 6, &dev)?)?;
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

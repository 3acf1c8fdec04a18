//! Layer normalisation that autograd can go through.
//!
//! Ba, Kiros, Hinton, "Layer Normalization", 2016 (arXiv:1607.06450);
//! PyTorch's `torch.nn.LayerNorm`. candle-nn's `LayerNorm` takes a fused
//! kernel for contiguous inputs that has no backward pass
//! (`apply_op3_no_bwd`): training through it silently cuts the gradient of
//! every pre-normed transformer branch. This module keeps the fused kernel
//! for inference and switches to composite ops whenever the input or the
//! weights are tracked by autograd.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

/// `LayerNorm` over the last dimension with an affine weight and bias; the
/// parameter names (`weight`, `bias`) are PyTorch's.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// A `LayerNorm(size)` under `vb` (weight initialised to 1, bias to 0).
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.))?;
    Ok(LayerNorm::new(weight, bias, eps))
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let tracked = x.track_op() || self.weight.track_op() || self.bias.track_op();
        if !tracked && x.is_contiguous() {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let dtype = x.dtype();
        let x = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composite path equals the fused kernel, and gradients reach the
    /// input and both parameters (the fused kernel alone gives none).
    #[test]
    fn matches_fused_kernel_and_has_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 5, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let fused = LayerNorm::new(w.clone(), b.clone(), 1e-5).forward(&x)?;
        let xv = Var::from_tensor(&x)?;
        let wv = Var::from_tensor(&w)?;
        let bv = Var::from_tensor(&b)?;
        let ln = LayerNorm::new(wv.as_tensor().clone(), bv.as_tensor().clone(), 1e-5);
        let out = ln.forward(xv.as_tensor())?;
        let diff = (out - &fused)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "composite vs fused: {diff}");
        let grads = (ln.forward(xv.as_tensor())? * 3.)?
            .sqr()?
            .sum_all()?
            .backward()?;
        for v in [&xv, &wv, &bv] {
            let g = grads.get(v.as_tensor()).expect("a gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.);
        }
        Ok(())
    }
}

//! Sinusoidal timestep embeddings and the MLP that projects them for the UNet.
//!
//! Sinusoidal position encoding from Vaswani et al., "Attention Is All You
//! Need", 2017, arXiv:1706.03762, used for diffusion timesteps by Ho, Jain,
//! Abbeel, "Denoising Diffusion Probabilistic Models", 2020, arXiv:2006.11239.
//!
//! Reference implementation: `diffusers.models.embeddings`
//! (`get_timestep_embedding`, `Timesteps`, `TimestepEmbedding`).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::models::resnet::Activation;
use crate::{Error, Result};

/// diffusers' `get_timestep_embedding`: `[N]` timesteps to `[N, embedding_dim]`
/// sinusoidal features, in f32 whatever the input dtype.
///
/// The frequencies are `exp(-ln(max_period) * i / (half_dim - downscale_freq_shift))`;
/// the output is `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`), zero
/// padded by one column when `embedding_dim` is odd. Fractional timesteps are
/// allowed.
///
/// # Shapes
/// - `timesteps`: `[N]` (any float or integer dtype)
/// - returns `[N, embedding_dim]`, f32
pub fn get_timestep_embedding(
    timesteps: &Tensor,
    embedding_dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Result<Tensor> {
    if timesteps.rank() != 1 {
        return Err(Error::Shape {
            what: "timesteps".to_string(),
            expected: "[N]".to_string(),
            got: format!("{:?}", timesteps.dims()),
        });
    }
    let half = embedding_dim / 2;
    let denom = half as f64 - downscale_freq_shift;
    if half == 0 || denom == 0.0 {
        return Err(Error::invalid(format!(
            "timestep embedding: dimension {embedding_dim} with frequency shift {downscale_freq_shift} has no frequencies"
        )));
    }
    // Same f32 rounding steps as diffusers (arange and products in f32); the
    // transcendental functions go through f64 so they are correctly rounded,
    // as PyTorch's f32 kernels are to within an ulp.
    let log_max = -(max_period.ln() as f32);
    let denom = denom as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (((log_max * i as f32) / denom) as f64).exp() as f32)
        .collect();
    let ts = timesteps.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let scale = scale as f32;
    let mut data = Vec::with_capacity(ts.len() * embedding_dim);
    for &t in &ts {
        let args: Vec<f32> = freqs.iter().map(|&f| scale * (t * f)).collect();
        let sin = args.iter().map(|&a| (a as f64).sin() as f32);
        let cos = args.iter().map(|&a| (a as f64).cos() as f32);
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if embedding_dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(
        data,
        (ts.len(), embedding_dim),
        timesteps.device(),
    )?)
}

/// diffusers' `Timesteps`: the parameter-free sinusoidal projection
/// (`time_proj`, no weights in checkpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct Timesteps {
    pub num_channels: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
    pub scale: f64,
}

impl Timesteps {
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale: 1.0,
        }
    }

    /// # Shapes
    /// - `timesteps`: `[N]`
    /// - returns `[N, num_channels]`, f32
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        get_timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            self.scale,
            10000.0,
        )
    }
}

/// diffusers' `TimestepEmbedding` (`time_embedding`): `linear_1`, act, `linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            act,
            linear_2: candle_nn::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }

    /// # Shapes
    /// - `xs`: `[N, in_channels]`
    /// - returns `[N, time_embed_dim]`
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(xs)?.apply(&self.act)?;
        Ok(self.linear_2.forward(&h)?)
    }
}

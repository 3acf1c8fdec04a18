//! Multi-head (cross-)attention, the GEGLU feed-forward and the transformer
//! block of the latent diffusion UNet, plus the single-head spatial attention
//! of the VAE mid block.
//!
//! Attention: Vaswani et al., "Attention Is All You Need", 2017,
//! arXiv:1706.03762. GEGLU: Shazeer, "GLU Variants Improve Transformer", 2020,
//! arXiv:2002.05202. Cross-attention conditioning of the UNet: Rombach et al.,
//! "High-Resolution Image Synthesis with Latent Diffusion Models", 2021,
//! arXiv:2112.10752.
//!
//! Reference implementation: `diffusers.models.attention_processor.Attention`
//! with `AttnProcessor2_0`, and `diffusers.models.attention`
//! (`BasicTransformerBlock`, `FeedForward`, `GEGLU`).

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::ops::layer_norm::{layer_norm, LayerNorm};
use crate::ops::linear::Linear;

use crate::ops::group_norm::GroupNorm;

use crate::models::resnet::group_norm;
use crate::{Error, Result};

/// Multi-head attention of the text encoders (CLIP, BERT) over already
/// projected queries, keys and values, with an optional additive mask
/// (causal `[T, T]` or padding `[B, 1, 1, T]`, f32, broadcast to the scores).
///
/// Scores, mask and softmax are computed in f32: a half-precision softmax
/// over a prompt's tokens loses enough to show in the image, and padding
/// biases such as `f32::MIN` do not fit in f16.
///
/// # Shapes
/// `q`, `k`, `v` `[B, T, C]` with `C = num_heads * head_dim` -> `[B, T, C]`
pub fn text_self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    num_heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, c) = q.dims3()?;
    if num_heads == 0 || c % num_heads != 0 {
        return Err(Error::invalid(format!(
            "attention: width {c} is not divisible by {num_heads} heads"
        )));
    }
    let head_dim = c / num_heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        Ok(x.reshape((b, t, num_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scale = (head_dim as f64).powf(-0.5);
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    // candle-nn's fused softmax kernel has no backward pass: a model in
    // training (`ensueno train clip`) takes the composite one.
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    }
    .to_dtype(v.dtype())?;
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, c))?)
}

/// Upper bound on the elements of one block of attention scores. Larger
/// problems are cut along batch x heads so that SD 1.5 at 512x512 (4096
/// tokens) does not materialise a multi-gigabyte score tensor at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// Settings of an [`Attention`] layer (diffusers' constructor arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the keys/values source; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Bias of `to_q`, `to_k`, `to_v`.
    pub bias: bool,
    /// Bias of `to_out.0`.
    pub out_bias: bool,
    /// Compute query-key products in f32 even for half-precision inputs.
    pub upcast_attention: bool,
    /// A `group_norm` applied to the input first (VAE mid block).
    pub norm_num_groups: Option<usize>,
    pub eps: f64,
    /// Add the input to the output (VAE mid block).
    pub residual_connection: bool,
    /// The output is divided by this.
    pub rescale_output_factor: f64,
}

impl AttentionConfig {
    /// diffusers' defaults for `heads` heads of width `dim_head` over `query_dim`.
    pub fn new(query_dim: usize, heads: usize, dim_head: usize) -> Self {
        Self {
            query_dim,
            cross_attention_dim: None,
            heads,
            dim_head,
            bias: false,
            out_bias: true,
            upcast_attention: false,
            norm_num_groups: None,
            eps: 1e-5,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }
}

/// diffusers' `Attention` with the default (scaled dot-product) processor.
///
/// Weights are `to_q`, `to_k`, `to_v`, `to_out.0` (and `group_norm`); old VAE
/// checkpoints name them `query`, `key`, `value`, `proj_attn`, which are
/// accepted when `to_q` is absent.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
    scale: f64,
    upcast_attention: bool,
    residual_connection: bool,
    rescale_output_factor: f64,
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(crate::ops::linear::linear_b(in_dim, out_dim, bias, vb)?)
}

impl Attention {
    pub fn new(vb: VarBuilder, config: &AttentionConfig) -> Result<Self> {
        if config.heads == 0 || config.dim_head == 0 {
            return Err(Error::invalid(format!(
                "attention {}: {} heads of width {} is empty",
                vb.prefix(),
                config.heads,
                config.dim_head
            )));
        }
        let inner = config.heads * config.dim_head;
        let kv_dim = config.cross_attention_dim.unwrap_or(config.query_dim);
        let group_norm = match config.norm_num_groups {
            Some(g) => Some(group_norm(
                g,
                config.query_dim,
                config.eps,
                vb.pp("group_norm"),
            )?),
            None => None,
        };
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, out) = if legacy {
            (
                vb.pp("query"),
                vb.pp("key"),
                vb.pp("value"),
                vb.pp("proj_attn"),
            )
        } else {
            (
                vb.pp("to_q"),
                vb.pp("to_k"),
                vb.pp("to_v"),
                vb.pp("to_out").pp("0"),
            )
        };
        Ok(Self {
            group_norm,
            to_q: linear(config.query_dim, inner, config.bias, q)?,
            to_k: linear(kv_dim, inner, config.bias, k)?,
            to_v: linear(kv_dim, inner, config.bias, v)?,
            to_out: linear(inner, config.query_dim, config.out_bias, out)?,
            heads: config.heads,
            dim_head: config.dim_head,
            scale: 1.0 / (config.dim_head as f64).sqrt(),
            upcast_attention: config.upcast_attention,
            residual_connection: config.residual_connection,
            rescale_output_factor: config.rescale_output_factor,
        })
    }

    /// Applies attention of `hidden_states` to itself or, when given, to
    /// `encoder_hidden_states`.
    ///
    /// # Shapes
    /// - `hidden_states`: `[B, T, query_dim]`, or `[B, query_dim, H, W]`
    ///   (treated as `H*W` tokens, output in the same layout)
    /// - `encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - returns the shape of `hidden_states`
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let spatial = hidden_states.rank() == 4;
        let mut xs = if spatial {
            let (b, c, h, w) = hidden_states.dims4()?;
            hidden_states.reshape((b, c, h * w))?.transpose(1, 2)?
        } else {
            hidden_states.clone()
        };
        let (b, t, _) = xs.dims3()?;
        if let Some(norm) = &self.group_norm {
            xs = norm
                .forward(&xs.transpose(1, 2)?.contiguous()?)?
                .transpose(1, 2)?;
        }
        // candle's batched matmul (inside Linear) mishandles some transposed
        // batch strides: give the projections a plain layout.
        let xs = xs.contiguous()?;
        let context = match encoder_hidden_states {
            Some(c) => c.contiguous()?,
            None => xs.clone(),
        };
        if context.rank() != 3 || context.dim(0)? != b {
            return Err(Error::Shape {
                what: "encoder_hidden_states".to_string(),
                expected: format!("batch {b}"),
                got: format!("{:?}", context.dims()),
            });
        }
        let s = context.dim(1)?;
        let q = self.to_q.forward(&xs)?;
        let k = self.to_k.forward(&context)?;
        let v = self.to_v.forward(&context)?;
        let split = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, n, self.heads, self.dim_head))?
                .transpose(1, 2)?
                .reshape((b * self.heads, n, self.dim_head))?)
        };
        let q = split(q, t)?;
        let k = split(k, s)?;
        let v = split(v, s)?;
        let attn = self.scaled_dot_product(&q, &k, &v)?;
        let attn = attn
            .reshape((b, self.heads, t, self.dim_head))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.dim_head))?;
        let mut out = self.to_out.forward(&attn)?;
        if spatial {
            let (b, c, h, w) = hidden_states.dims4()?;
            out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        }
        if self.residual_connection {
            out = (out + residual)?;
        }
        if self.rescale_output_factor != 1.0 {
            out = (out / self.rescale_output_factor)?;
        }
        Ok(out)
    }

    /// softmax(q k^T * scale) v over `[N, T, D]` tensors, with the softmax in
    /// f32, cut along `N` when the scores would be too large.
    fn scaled_dot_product(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32) {
            // The blocked CPU kernel never holds the whole score matrix (and
            // computes in f32 already, so `upcast_attention` changes nothing).
            return crate::ops::attention::scaled_dot_product_attention(q, k, v, self.scale);
        }
        let (n, t, _) = q.dims3()?;
        let s = k.dim(1)?;
        let per_item = (t * s).max(1);
        let chunk = (MAX_SCORE_ELEMENTS / per_item).clamp(1, n.max(1));
        if chunk >= n {
            return self.attend(q, k, v);
        }
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            outs.push(self.attend(
                &q.narrow(0, start, len)?,
                &k.narrow(0, start, len)?,
                &v.narrow(0, start, len)?,
            )?);
            start += len;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dtype = v.dtype();
        let (q, k) = if self.upcast_attention {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q.clone(), k.clone())
        };
        let q = (q * self.scale)?.contiguous()?;
        let kt = k.transpose(1, 2)?.contiguous()?;
        let scores = q.matmul(&kt)?.to_dtype(DType::F32)?;
        // Composite softmax (max, exp, sum, div) so autograd can go through it.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
        Ok(probs.matmul(&v.contiguous()?)?)
    }
}

/// diffusers' `GEGLU`: `proj` to twice the width, then `h * gelu(gate)`.
#[derive(Debug, Clone)]
pub struct GEGLU {
    proj: Linear,
    dim_out: usize,
}

impl GEGLU {
    pub fn new(vb: VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        Ok(Self {
            proj: crate::ops::linear::linear(dim_in, 2 * dim_out, vb.pp("proj"))?,
            dim_out,
        })
    }

    /// # Shapes
    /// - `xs`: `[..., dim_in]`; returns `[..., dim_out]`
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        debug_assert_eq!(h.dim(D::Minus1)?, 2 * self.dim_out);
        Ok(crate::ops::geglu::geglu(&h)?)
    }
}

/// diffusers' `FeedForward` with the `geglu` activation: `net.0` (GEGLU),
/// `net.1` (dropout, no weights), `net.2` (linear).
#[derive(Debug, Clone)]
pub struct FeedForward {
    geglu: GEGLU,
    out: Linear,
}

impl FeedForward {
    /// `inner_dim` defaults to `4 * dim`; `dim_out` to `dim`.
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        dim_out: Option<usize>,
        inner_dim: Option<usize>,
    ) -> Result<Self> {
        let inner = inner_dim.unwrap_or(4 * dim);
        let net = vb.pp("net");
        Ok(Self {
            geglu: GEGLU::new(net.pp("0"), dim, inner)?,
            out: crate::ops::linear::linear(inner, dim_out.unwrap_or(dim), net.pp("2"))?,
        })
    }

    /// # Shapes
    /// - `xs`: `[..., dim]`; returns `[..., dim_out]`
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.out.forward(&self.geglu.forward(xs)?)?)
    }
}

/// Settings of a [`BasicTransformerBlock`] (layer-norm variant).
#[derive(Debug, Clone, PartialEq)]
pub struct BasicTransformerBlockConfig {
    pub dim: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    /// Width of the conditioning; `None` builds no `attn2`.
    pub cross_attention_dim: Option<usize>,
    /// `attn1` attends to the conditioning instead of itself.
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`:
/// self-attention, cross-attention and a GEGLU feed-forward, each pre-normed
/// and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: Option<LayerNorm>,
    attn2: Option<Attention>,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn new(vb: VarBuilder, config: &BasicTransformerBlockConfig) -> Result<Self> {
        let dim = config.dim;
        let attn = |cross: Option<usize>| AttentionConfig {
            cross_attention_dim: cross,
            upcast_attention: config.upcast_attention,
            ..AttentionConfig::new(dim, config.num_attention_heads, config.attention_head_dim)
        };
        let attn1_cross = if config.only_cross_attention {
            config.cross_attention_dim
        } else {
            None
        };
        let norm1 = layer_norm(dim, 1e-5, vb.pp("norm1"))?;
        let attn1 = Attention::new(vb.pp("attn1"), &attn(attn1_cross))?;
        let (norm2, attn2) = match config.cross_attention_dim {
            Some(cross) => (
                Some(layer_norm(dim, 1e-5, vb.pp("norm2"))?),
                Some(Attention::new(vb.pp("attn2"), &attn(Some(cross)))?),
            ),
            None => (None, None),
        };
        let norm3 = layer_norm(dim, 1e-5, vb.pp("norm3"))?;
        let ff = FeedForward::new(vb.pp("ff"), dim, None, None)?;
        Ok(Self {
            norm1,
            attn1,
            norm2,
            attn2,
            norm3,
            ff,
            only_cross_attention: config.only_cross_attention,
        })
    }

    /// # Shapes
    /// - `xs`: `[B, T, dim]`
    /// - `encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - returns `[B, T, dim]`
    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(xs)?;
        let ctx1 = if self.only_cross_attention {
            encoder_hidden_states
        } else {
            None
        };
        let mut xs = (self.attn1.forward(&h, ctx1)? + xs)?;
        if let (Some(norm2), Some(attn2)) = (&self.norm2, &self.attn2) {
            let h = norm2.forward(&xs)?;
            xs = (attn2.forward(&h, encoder_hidden_states)? + xs)?;
        }
        let h = self.norm3.forward(&xs)?;
        Ok((self.ff.forward(&h)? + xs)?)
    }
}

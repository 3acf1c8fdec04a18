//! Scaled dot-product attention as a blocked (flash-attention style) CPU
//! custom op with a backward pass.
//!
//! Attention Is All You Need (Vaswani et al., 2017, arXiv:1706.03762) for the
//! operation; FlashAttention (Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri
//! Rudra, Christopher Ré, 2022, arXiv:2205.14135) and FlashAttention-2 (Tri
//! Dao, 2023, arXiv:2307.08691) for the blocking: queries are processed in
//! blocks against key blocks with an online softmax, so the `[Tq, Tk]` score
//! matrix never exists in memory, and the backward pass recomputes the
//! probabilities block by block from the per-row log-sum-exp kept by the
//! forward pass. Reference semantics: `torch.nn.functional.
//! scaled_dot_product_attention` as called by diffusers'
//! `models.attention_processor.AttnProcessor2_0` (no mask, no dropout).
//!
//! The fast path is f32 on the CPU; other dtypes and devices use the
//! composite implementation (softmax in f32).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use gemm::Parallelism;

use super::group_norm::{exp_approx, multiversion, par_for, SyncPtr};
use crate::{Error, Result};

/// Query rows per task of the forward pass.
const FWD_BQ: usize = 64;
/// Keys per block of the forward pass (the score block is FWD_BQ x FWD_BK).
const FWD_BK: usize = 256;
/// Query and key block sizes of the backward pass.
const BWD_BQ: usize = 64;
const BWD_BK: usize = 128;

/// `softmax(q k^T * scale) v` for every batch entry (batch x heads folded
/// into one dimension).
///
/// # Shapes
/// - `q`: `[B, Tq, D]`
/// - `k`: `[B, Tk, D]`
/// - `v`: `[B, Tk, Dv]`
/// - returns `[B, Tq, Dv]`
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let shape_err = |what: &str, expected: String, got: &Tensor| Error::Shape {
        what: format!("attention {what}"),
        expected,
        got: format!("{:?}", got.dims()),
    };
    let (b, _tq, d) = q
        .dims3()
        .map_err(|_| shape_err("query", "[B, Tq, D]".into(), q))?;
    let (bk, tk, dk) = k
        .dims3()
        .map_err(|_| shape_err("key", "[B, Tk, D]".into(), k))?;
    if bk != b || dk != d {
        return Err(shape_err("key", format!("[{b}, Tk, {d}]"), k));
    }
    let (bv, tv, _dv) = v
        .dims3()
        .map_err(|_| shape_err("value", "[B, Tk, Dv]".into(), v))?;
    if bv != b || tv != tk {
        return Err(shape_err("value", format!("[{b}, {tk}, Dv]"), v));
    }
    let fast = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32) && tk > 0;
    if fast {
        let op = AttentionOp {
            scale: scale as f32,
            lse: Mutex::new(Vec::new()),
        };
        Ok(q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
    } else {
        Ok(scaled_dot_product_attention_composite(q, k, v, scale)?)
    }
}

/// The reference implementation from basic candle ops (differentiable on any
/// device and dtype; the softmax runs in f32).
pub fn scaled_dot_product_attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let s = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let p = candle_nn::ops::softmax(&s.to_dtype(internal)?, candle_core::D::Minus1)?;
    p.to_dtype(dtype)?.matmul(&v.contiguous()?)
}

struct AttentionOp {
    scale: f32,
    /// Per-row log-sum-exp of the scaled scores, `[B * Tq]`, for backward.
    lse: Mutex<Vec<f32>>,
}

fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("attention: expected contiguous tensors"),
    }
}

struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
}

/// Forward over all batches: returns (output `[B, Tq, Dv]`, lse `[B * Tq]`).
fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, tq, tk, d, dv } = *dims;
    let mut out = vec![0f32; b * tq * dv];
    let mut lse = vec![0f32; b * tq];
    let n_qblocks = tq.div_ceil(FWD_BQ);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let lse_ptr = SyncPtr(lse.as_mut_ptr());
    let work = b * tq * tk * (d + dv);
    par_for(b * n_qblocks, work >= 1 << 16, |task| {
        let (bi, qb) = (task / n_qblocks, task % n_qblocks);
        let q0 = qb * FWD_BQ;
        let rows = FWD_BQ.min(tq - q0);
        let qs = &q[(bi * tq + q0) * d..(bi * tq + q0 + rows) * d];
        let ks = &k[bi * tk * d..(bi + 1) * tk * d];
        let vs = &v[bi * tk * dv..(bi + 1) * tk * dv];
        // SAFETY: each task writes its own rows of the output and of lse.
        let (os, ls) = unsafe {
            (
                out_ptr.slice((bi * tq + q0) * dv, rows * dv),
                lse_ptr.slice(bi * tq + q0, rows),
            )
        };
        forward_block(qs, ks, vs, os, ls, rows, tk, d, dv, scale);
    });
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
fn forward_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    rows: usize,
    tk: usize,
    d: usize,
    dv: usize,
    scale: f32,
) {
    let bk = FWD_BK.min(tk);
    let mut s = vec![0f32; rows * bk];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut k0 = 0;
    while k0 < tk {
        let kn = bk.min(tk - k0);
        // SAFETY: all pointers and strides describe in-bounds row-major blocks.
        unsafe {
            mm(
                rows,
                kn,
                d,
                s.as_mut_ptr(),
                bk,
                false,
                q.as_ptr(),
                d,
                1,
                k.as_ptr().add(k0 * d),
                1,
                d,
                scale,
            );
        }
        for r in 0..rows {
            let row = &mut s[r * bk..r * bk + kn];
            let mx = row_max(row);
            let m_new = m[r].max(mx);
            let alpha = if m[r] == f32::NEG_INFINITY {
                0.0
            } else {
                exp_approx(m[r] - m_new)
            };
            let sum = exp_sub_sum(row, m_new);
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            if alpha != 1.0 {
                scale_slice(&mut out[r * dv..(r + 1) * dv], alpha);
            }
        }
        // SAFETY: as above; `out` rows accumulate this key block's values.
        unsafe {
            mm(
                rows,
                dv,
                kn,
                out.as_mut_ptr(),
                dv,
                true,
                s.as_ptr(),
                bk,
                1,
                v.as_ptr().add(k0 * dv),
                dv,
                1,
                1.0,
            );
        }
        k0 += kn;
    }
    for r in 0..rows {
        scale_slice(&mut out[r * dv..(r + 1) * dv], 1.0 / l[r]);
        lse[r] = m[r] + l[r].ln();
    }
}

multiversion! {
    fn row_max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut it = x.chunks_exact(16);
        for ch in &mut it {
            for l in 0..16 {
                acc[l] = acc[l].max(ch[l]);
            }
        }
        let mut mx = f32::NEG_INFINITY;
        for &v in acc.iter().chain(it.remainder()) {
            mx = mx.max(v);
        }
        mx
    }
}

multiversion! {
    /// `x = exp(x - m)` in place; returns the sum.
    fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; 16];
        let mut it = x.chunks_exact_mut(16);
        for ch in &mut it {
            for l in 0..16 {
                let e = exp_approx(ch[l] - m);
                ch[l] = e;
                acc[l] += e;
            }
        }
        let mut sum = 0f32;
        for v in it.into_remainder() {
            *v = exp_approx(*v - m);
            sum += *v;
        }
        sum + acc.iter().sum::<f32>()
    }
}

multiversion! {
    fn scale_slice(x: &mut [f32], a: f32) {
        for v in x.iter_mut() {
            *v *= a;
        }
    }
}

multiversion! {
    /// `p = exp(s - lse)`; `ds = p * (dp - delta)` written over `dp`.
    fn softmax_grad_row(s: &mut [f32], dp: &mut [f32], lse: f32, delta: f32) {
        for (sv, dv) in s.iter_mut().zip(dp.iter_mut()) {
            let p = exp_approx(*sv - lse);
            *sv = p;
            *dv = p * (*dv - delta);
        }
    }
}

multiversion! {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let mut ai = a.chunks_exact(16);
        let mut bi = b.chunks_exact(16);
        for (x, y) in (&mut ai).zip(&mut bi) {
            for l in 0..16 {
                acc[l] = x[l].mul_add(y[l], acc[l]);
            }
        }
        let mut s = 0f32;
        for (x, y) in ai.remainder().iter().zip(bi.remainder()) {
            s += x * y;
        }
        s + acc.iter().sum::<f32>()
    }
}

/// One `dst (+)= beta * lhs * rhs` with explicit row/column strides.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        super::sgemm(
            (m, n, k),
            dst,
            (dst_rs, 1),
            accumulate,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
            beta,
            Parallelism::None,
        )
    }
}

struct BwdInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
}

/// Backward over all batches: returns (dq, dk, dv).
fn attention_backward(
    inp: &BwdInputs<'_>,
    dims: &Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, tq, tk, d, dv } = *dims;
    let mut dq = vec![0f32; b * tq * d];
    let mut dk = vec![0f32; b * tk * d];
    let mut dvv = vec![0f32; b * tk * dv];
    let dq_ptr = SyncPtr(dq.as_mut_ptr());
    let dk_ptr = SyncPtr(dk.as_mut_ptr());
    let dv_ptr = SyncPtr(dvv.as_mut_ptr());
    let work = b * tq * tk * (d + dv);
    // One task per batch entry: dq accumulates over key blocks, so the blocks
    // of one entry stay on one thread.
    par_for(b, work >= 1 << 16, |bi| {
        let q = &inp.q[bi * tq * d..(bi + 1) * tq * d];
        let k = &inp.k[bi * tk * d..(bi + 1) * tk * d];
        let v = &inp.v[bi * tk * dv..(bi + 1) * tk * dv];
        let o = &inp.o[bi * tq * dv..(bi + 1) * tq * dv];
        let g = &inp.dout[bi * tq * dv..(bi + 1) * tq * dv];
        let lse = &inp.lse[bi * tq..(bi + 1) * tq];
        // SAFETY: each task owns the gradients of its batch entry.
        let (dq, dk, dvs) = unsafe {
            (
                dq_ptr.slice(bi * tq * d, tq * d),
                dk_ptr.slice(bi * tk * d, tk * d),
                dv_ptr.slice(bi * tk * dv, tk * dv),
            )
        };
        let delta: Vec<f32> = (0..tq)
            .map(|r| dot(&g[r * dv..(r + 1) * dv], &o[r * dv..(r + 1) * dv]))
            .collect();
        let bk = BWD_BK.min(tk);
        let bq = BWD_BQ.min(tq);
        let mut s = vec![0f32; bq * bk];
        let mut dp = vec![0f32; bq * bk];
        let mut k0 = 0;
        while k0 < tk {
            let kn = bk.min(tk - k0);
            let mut q0 = 0;
            while q0 < tq {
                let qn = bq.min(tq - q0);
                // SAFETY (all products): in-bounds row-major blocks; dst never aliases a source.
                unsafe {
                    // S = scale * Q_i K_j^T
                    mm(
                        qn,
                        kn,
                        d,
                        s.as_mut_ptr(),
                        bk,
                        false,
                        q.as_ptr().add(q0 * d),
                        d,
                        1,
                        k.as_ptr().add(k0 * d),
                        1,
                        d,
                        scale,
                    );
                    // dP = dO_i V_j^T
                    mm(
                        qn,
                        kn,
                        dv,
                        dp.as_mut_ptr(),
                        bk,
                        false,
                        g.as_ptr().add(q0 * dv),
                        dv,
                        1,
                        v.as_ptr().add(k0 * dv),
                        1,
                        dv,
                        1.0,
                    );
                }
                for r in 0..qn {
                    softmax_grad_row(
                        &mut s[r * bk..r * bk + kn],
                        &mut dp[r * bk..r * bk + kn],
                        lse[q0 + r],
                        delta[q0 + r],
                    );
                }
                unsafe {
                    // dV_j += P^T dO_i
                    mm(
                        kn,
                        dv,
                        qn,
                        dvs.as_mut_ptr().add(k0 * dv),
                        dv,
                        true,
                        s.as_ptr(),
                        1,
                        bk,
                        g.as_ptr().add(q0 * dv),
                        dv,
                        1,
                        1.0,
                    );
                    // dQ_i += scale * dS K_j
                    mm(
                        qn,
                        d,
                        kn,
                        dq.as_mut_ptr().add(q0 * d),
                        d,
                        true,
                        dp.as_ptr(),
                        bk,
                        1,
                        k.as_ptr().add(k0 * d),
                        d,
                        1,
                        scale,
                    );
                    // dK_j += scale * dS^T Q_i
                    mm(
                        kn,
                        d,
                        qn,
                        dk.as_mut_ptr().add(k0 * d),
                        d,
                        true,
                        dp.as_ptr(),
                        1,
                        bk,
                        q.as_ptr().add(q0 * d),
                        d,
                        1,
                        scale,
                    );
                }
                q0 += qn;
            }
            k0 += kn;
        }
    });
    (dq, dk, dvv)
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ensueno-attention"
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
        let (q, k, v) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let (b, tq, d) = l1.shape().dims3()?;
        let (_, tk, _) = l2.shape().dims3()?;
        let (_, _, dv) = l3.shape().dims3()?;
        let dims = Dims { b, tq, tk, d, dv };
        let (out, lse) = attention_forward(q, k, v, &dims, self.scale);
        if let Ok(mut saved) = self.lse.lock() {
            *saved = lse;
        }
        Ok((CpuStorage::F32(out), Shape::from((b, tq, dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let res = res.contiguous()?;
        let (b, tq, d) = q.dims3()?;
        let (_, tk, _) = k.dims3()?;
        let (_, _, dv) = v.dims3()?;
        let dims = Dims { b, tq, tk, d, dv };
        let guards = [q, k, v, &res, &grad].map(|t| t.storage_and_layout());
        let mut slices = Vec::with_capacity(5);
        for (st, l) in guards.iter() {
            match &**st {
                Storage::Cpu(c) => slices.push(cpu_slice(c, l)?),
                _ => candle_core::bail!("attention backward: expected CPU tensors"),
            }
        }
        let mut lse = self.lse.lock().map(|l| l.clone()).unwrap_or_default();
        if lse.len() != b * tq {
            lse = attention_forward(slices[0], slices[1], slices[2], &dims, self.scale).1;
        }
        let inputs = BwdInputs {
            q: slices[0],
            k: slices[1],
            v: slices[2],
            o: slices[3],
            dout: slices[4],
            lse: &lse,
        };
        let (dq, dk, dvv) = attention_backward(&inputs, &dims, self.scale);
        drop(guards);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, tq, d), dev)?),
            Some(Tensor::from_vec(dk, (b, tk, d), dev)?),
            Some(Tensor::from_vec(dvv, (b, tk, dv), dev)?),
        ))
    }
}

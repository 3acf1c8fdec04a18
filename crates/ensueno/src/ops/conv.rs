//! 2D convolution and transposed convolution as candle custom ops with
//! forward and backward passes.
//!
//! candle 0.11's CPU convolution is several times slower than PyTorch's, and
//! its transposed convolution (used for the input gradient) slower still.
//! Here every pass is lowered to large GEMMs (the `gemm` crate, the same one
//! candle's matmul uses) on im2col tiles sized to stay in the L2 cache:
//!
//! * forward: `Y[O, Ho*Wo] = W[O, C*kh*kw] x col(X)[C*kh*kw, Ho*Wo]`
//!   per image and group (1x1 stride-1 convolutions read `X` in place);
//! * input gradient: `col(dX) = W^T x dY`, scattered back with col2im;
//! * weight gradient: `dW = sum over images of dY x col(X)^T`.
//!
//! 3x3 stride-1 convolutions with enough channels (most of a UNet, and the
//! input and weight gradients of each) take Winograd's F(2x2, 3x3) instead
//! (`conv/winograd.rs`): 2.25x fewer multiplications.
//!
//! Work is split into (image, group, tile) units spread over candle's CPU
//! thread pool, each running a single-threaded GEMM. The transposed
//! convolution is the input-gradient computation of the convolution with the
//! roles of input and output swapped, so the three kernels serve both.
//!
//! The fast path takes f32 tensors on the CPU; everything else (CUDA, f16,
//! f64...) goes through candle's own `conv2d` / `conv_transpose2d`, so models
//! can call these functions unconditionally.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use gemm::Parallelism;

use crate::{Error, Result};

mod winograd;
#[cfg(target_arch = "x86_64")]
mod winograd_avx512;
mod winograd_gemm;
pub use winograd::set_enabled as set_winograd;

/// Hyper-parameters of a 2D convolution (the same for both spatial axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Zero padding added on every side of the input.
    pub padding: usize,
    /// Step between two output positions, in input pixels.
    pub stride: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Number of channel groups; input and output channels must divide by it.
    pub groups: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

impl From<candle_nn::Conv2dConfig> for Conv2dConfig {
    fn from(c: candle_nn::Conv2dConfig) -> Self {
        Self {
            padding: c.padding,
            stride: c.stride,
            dilation: c.dilation,
            groups: c.groups,
        }
    }
}

/// Hyper-parameters of a 2D transposed convolution (PyTorch semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose2dConfig {
    /// Implicit padding removed from every side of the output.
    pub padding: usize,
    /// Extra rows/columns added at the bottom/right of the output; must be
    /// smaller than `stride` or `dilation`.
    pub output_padding: usize,
    /// Upsampling factor.
    pub stride: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Number of channel groups.
    pub groups: usize,
}

impl Default for ConvTranspose2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            output_padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

impl From<candle_nn::ConvTranspose2dConfig> for ConvTranspose2dConfig {
    fn from(c: candle_nn::ConvTranspose2dConfig) -> Self {
        Self {
            padding: c.padding,
            output_padding: c.output_padding,
            stride: c.stride,
            dilation: c.dilation,
            groups: 1,
        }
    }
}

/// Geometry of one convolution `X[n, c, h, w] * W[o, c/groups, kh, kw] ->
/// Y[n, o, ho, wo]`. A transposed convolution is described by the
/// convolution whose input gradient it is (its output is `X`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    groups: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn og(&self) -> usize {
        self.o / self.groups
    }
    fn kk(&self) -> usize {
        self.kh * self.kw
    }
    /// Rows of the im2col matrix of one group.
    fn kdim(&self) -> usize {
        self.cg() * self.kk()
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn howo(&self) -> usize {
        self.ho * self.wo
    }
    /// 1x1, stride 1, no padding: the input is its own im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    fn x_shape(&self) -> Shape {
        (self.n, self.c, self.h, self.w).into()
    }
    fn w_shape(&self) -> Shape {
        (self.o, self.cg(), self.kh, self.kw).into()
    }
    fn y_shape(&self) -> Shape {
        (self.n, self.o, self.ho, self.wo).into()
    }
    /// Output rows per im2col tile: about `TILE_BYTES` of im2col data for
    /// `rows_of_col` matrix rows, at least one output row.
    fn tile_rows(&self, rows_of_col: usize) -> usize {
        let cols = (tile_bytes() / 4 / rows_of_col.max(1)).max(1);
        (cols / self.wo.max(1)).clamp(1, self.ho.max(1))
    }
}

/// Target size of one im2col tile; overridable for tuning with
/// `ENSUENO_CONV_TILE_KB`.
fn tile_bytes() -> usize {
    static TILE: OnceLock<usize> = OnceLock::new();
    *TILE.get_or_init(|| {
        std::env::var("ENSUENO_CONV_TILE_KB")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&k| k > 0)
            .map_or(1024 * 1024, |k| k * 1024)
    })
}

fn out_size(input: usize, k: usize, pad: usize, stride: usize, dil: usize) -> Option<usize> {
    let span = dil * (k - 1) + 1;
    (input + 2 * pad)
        .checked_sub(span)
        .map(|free| free / stride + 1)
}

fn check_hyper(padding: usize, stride: usize, dilation: usize, groups: usize) -> Result<()> {
    if stride == 0 || dilation == 0 || groups == 0 {
        return Err(Error::invalid(format!(
            "conv: stride ({stride}), dilation ({dilation}) and groups ({groups}) must be positive (padding {padding})"
        )));
    }
    Ok(())
}

/// Geometry of `conv2d(x, w)`, validated.
fn conv_geom(x: &Tensor, w: &Tensor, cfg: &Conv2dConfig) -> Result<Geom> {
    check_hyper(cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
    let (n, c, h, wd) = x.dims4()?;
    let (o, cg, kh, kw) = w.dims4()?;
    let g = cfg.groups;
    if cg * g != c || o % g != 0 || kh == 0 || kw == 0 {
        return Err(Error::Shape {
            what: "conv2d weight".into(),
            expected: format!(
                "[O divisible by {g}, {} / {g}, kh, kw] for input {:?}",
                c,
                x.dims()
            ),
            got: format!("{:?}", w.dims()),
        });
    }
    let too_small = || {
        Error::invalid(format!(
            "conv2d: input {:?} is smaller than the dilated kernel {kh}x{kw} (padding {}, dilation {})",
            x.dims(),
            cfg.padding,
            cfg.dilation
        ))
    };
    let ho = out_size(h, kh, cfg.padding, cfg.stride, cfg.dilation).ok_or_else(too_small)?;
    let wo = out_size(wd, kw, cfg.padding, cfg.stride, cfg.dilation).ok_or_else(too_small)?;
    Ok(Geom {
        n,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        stride: cfg.stride,
        pad: cfg.padding,
        dil: cfg.dilation,
        groups: g,
        ho,
        wo,
    })
}

/// Geometry of the convolution whose input gradient is
/// `conv_transpose2d(x, w)`, validated.
fn conv_transpose_geom(x: &Tensor, w: &Tensor, cfg: &ConvTranspose2dConfig) -> Result<Geom> {
    check_hyper(cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
    let (n, c_in, h, wd) = x.dims4()?;
    let (c_in_k, cog, kh, kw) = w.dims4()?;
    let g = cfg.groups;
    if c_in_k != c_in || c_in % g != 0 || kh == 0 || kw == 0 {
        return Err(Error::Shape {
            what: "conv_transpose2d weight".into(),
            expected: format!(
                "[{c_in} (divisible by {g}), C_out / {g}, kh, kw] for input {:?}",
                x.dims()
            ),
            got: format!("{:?}", w.dims()),
        });
    }
    if cfg.output_padding >= cfg.stride.max(cfg.dilation) {
        return Err(Error::invalid(format!(
            "conv_transpose2d: output_padding ({}) must be smaller than stride ({}) or dilation ({})",
            cfg.output_padding, cfg.stride, cfg.dilation
        )));
    }
    let size = |i: usize, k: usize| -> Result<usize> {
        ((i - 1) * cfg.stride + cfg.dilation * (k - 1) + cfg.output_padding + 1)
            .checked_sub(2 * cfg.padding)
            .filter(|&s| s > 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "conv_transpose2d: padding {} leaves no output for input {:?} and kernel {kh}x{kw}",
                    cfg.padding,
                    x.dims()
                ))
            })
    };
    if h == 0 || wd == 0 {
        return Err(Error::invalid(format!(
            "conv_transpose2d: empty input {:?}",
            x.dims()
        )));
    }
    let (hout, wout) = (size(h, kh)?, size(wd, kw)?);
    Ok(Geom {
        n,
        c: cog * g,
        h: hout,
        w: wout,
        o: c_in,
        kh,
        kw,
        stride: cfg.stride,
        pad: cfg.padding,
        dil: cfg.dilation,
        groups: g,
        ho: h,
        wo: wd,
    })
}

// ---------------------------------------------------------------------------
// Kernels on f32 slices.
// ---------------------------------------------------------------------------

/// A raw pointer that worker threads may share; every use documents why the
/// threads touch disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
// SAFETY: only used for writes to disjoint regions (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method so closures capture the wrapper, not the raw field.
    pub(super) fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

thread_local! {
    /// Per-thread im2col tile, kept between calls to avoid reallocating.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` floats, which starts on
/// a 64-byte (cache-line) boundary: vector stores that straddle two lines
/// cost about twice as much, and the Winograd transforms are bound by their
/// stores (a misaligned buffer made the input transform 30-50% slower).
fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    const LINE: usize = 16;
    TILE.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() < len + LINE {
            t.resize(len + LINE, 0.0);
        }
        let skip = (LINE - (t.as_ptr() as usize / 4) % LINE) % LINE;
        f(&mut t[skip..skip + len])
    })
}

pub(super) fn n_threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f(thread_id, unit)` for every unit in `0..n_units`, spread over
/// candle's CPU pool. Returns the GEMM parallelism the units should use:
/// with fewer units than threads, units run here one after the other and
/// each GEMM is parallel instead.
pub(super) fn for_each_unit(n_units: usize, f: impl Fn(usize, usize, Parallelism) + Sync) {
    let threads = n_threads();
    if threads == 1 || n_units < threads {
        let par = if threads == 1 {
            Parallelism::None
        } else {
            Parallelism::Rayon(threads)
        };
        for u in 0..n_units {
            f(0, u, par);
        }
        return;
    }
    let cursor = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|tid| loop {
        let u = cursor.fetch_add(1, Ordering::Relaxed);
        if u >= n_units {
            break;
        }
        f(tid, u, Parallelism::None);
    });
}

/// As [`for_each_unit`], but thread `tid` always gets the same contiguous
/// range of units, run in order: for per-thread partial sums whose total
/// must not depend on timing (exact training resume needs bit-identical
/// gradients).
fn for_each_unit_static(n_units: usize, f: impl Fn(usize, usize, Parallelism) + Sync) {
    let threads = n_threads();
    if threads == 1 || n_units < threads {
        return for_each_unit(n_units, f);
    }
    candle_core::utils::barrier_pool().execute(|tid| {
        let (lo, hi) = (tid * n_units / threads, (tid + 1) * n_units / threads);
        for u in lo..hi {
            f(tid, u, Parallelism::None);
        }
    });
}

/// Output columns `lo..hi` whose input column `ow * stride + off` lies in
/// `0..w`.
fn valid_cols(off: isize, stride: usize, w: usize, wo: usize) -> (usize, usize) {
    let s = stride as isize;
    let hi = (w as isize - off).max(0);
    let hi = (((hi + s - 1) / s) as usize).min(wo);
    let lo = (((-off).max(0) + s - 1) / s) as usize;
    (lo.min(hi), hi)
}

/// Fills `col[cg * kh * kw, rows * wo]` with the input patches of output rows
/// `oh0..oh0 + rows`; `x` is one image-group `[cg, h, w]`.
fn im2col(g: &Geom, x: &[f32], oh0: usize, rows: usize, col: &mut [f32]) {
    let (h, w, wo, s) = (g.h, g.w, g.wo, g.stride);
    let cols = rows * wo;
    for ci in 0..g.cg() {
        let xc = &x[ci * g.hw()..(ci + 1) * g.hw()];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = (ci * g.kh + ki) * g.kw + kj;
                let dst_row = &mut col[r * cols..(r + 1) * cols];
                let off = (kj * g.dil) as isize - g.pad as isize;
                let (lo, hi) = valid_cols(off, s, w, wo);
                for (t, dst) in dst_row.chunks_exact_mut(wo).enumerate() {
                    let ih = ((oh0 + t) * s + ki * g.dil) as isize - g.pad as isize;
                    if ih < 0 || ih >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &xc[ih as usize * w..(ih as usize + 1) * w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if lo < hi {
                        let start = (lo as isize * s as isize + off) as usize;
                        if s == 1 {
                            dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                        } else {
                            for (d, v) in dst[lo..hi].iter_mut().zip(src[start..].iter().step_by(s))
                            {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds `col[cb * kh * kw, rows * wo]` (patch gradients of output rows
/// `oh0..oh0 + rows`) into `dx[cb, h, w]`: the adjoint of [`im2col`].
fn col2im_add(g: &Geom, col: &[f32], cb: usize, oh0: usize, rows: usize, dx: &mut [f32]) {
    let (h, w, wo, s) = (g.h, g.w, g.wo, g.stride);
    let cols = rows * wo;
    for ci in 0..cb {
        let xc = &mut dx[ci * g.hw()..(ci + 1) * g.hw()];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = (ci * g.kh + ki) * g.kw + kj;
                let src_row = &col[r * cols..(r + 1) * cols];
                let off = (kj * g.dil) as isize - g.pad as isize;
                let (lo, hi) = valid_cols(off, s, w, wo);
                if lo >= hi {
                    continue;
                }
                for (t, src) in src_row.chunks_exact(wo).enumerate() {
                    let ih = ((oh0 + t) * s + ki * g.dil) as isize - g.pad as isize;
                    if ih < 0 || ih >= h as isize {
                        continue;
                    }
                    let dst = &mut xc[ih as usize * w..(ih as usize + 1) * w];
                    let start = (lo as isize * s as isize + off) as usize;
                    if s == 1 {
                        for (d, v) in dst[start..start + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in dst[start..].iter_mut().step_by(s).zip(&src[lo..hi]) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv(x, w)`: `x [n, c, h, w]`, `w [o, c/groups, kh, kw]` -> `[n, o, ho, wo]`.
fn conv_fwd(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
    if winograd::applies(g) {
        winograd::conv3x3(g, x, w)
    } else {
        conv_fwd_im2col(g, x, w)
    }
}

/// [`conv_fwd`] by im2col + GEMM, for every geometry.
fn conv_fwd_im2col(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
    // SAFETY: every unit overwrites (no accumulation) its block of output
    // channels and pixels, and the units tile the output.
    let mut y = unsafe { super::uninit_f32(g.n * g.o * g.howo()) };
    let (cg, og, kdim, howo) = (g.cg(), g.og(), g.kdim(), g.howo());
    let rows = if g.is_pointwise() {
        g.tile_rows(cg)
    } else {
        g.tile_rows(kdim)
    };
    let tiles = g.ho.div_ceil(rows);
    let yp = SharedMut(y.as_mut_ptr());
    for_each_unit(g.n * g.groups * tiles, |_, u, par| {
        let (ng, t) = (u / tiles, u % tiles);
        let (ni, gi) = (ng / g.groups, ng % g.groups);
        let oh0 = t * rows;
        let r = rows.min(g.ho - oh0);
        let cols = r * g.wo;
        let xg = &x[(ni * g.c + gi * cg) * g.hw()..][..cg * g.hw()];
        let wg = &w[gi * og * kdim..][..og * kdim];
        // SAFETY: unit (image, group, tile) writes only rows gi*og..(gi+1)*og
        // and columns oh0*wo..oh0*wo+cols of image ni, which no other unit
        // touches; the region lies inside `y` by construction.
        let dst = yp.at((ni * g.o + gi * og) * howo + oh0 * g.wo);
        if g.is_pointwise() {
            let src = &xg[oh0 * g.wo..];
            // SAFETY: lhs [og, cg] and rhs [cg, cols] (row stride hw) lie in
            // `wg` and `xg`; dst as above.
            unsafe {
                super::sgemm(
                    (og, cols, cg),
                    dst,
                    (howo, 1),
                    false,
                    wg.as_ptr(),
                    (cg, 1),
                    src.as_ptr(),
                    (g.hw(), 1),
                    1.0,
                    par,
                )
            }
        } else {
            with_tile(kdim * cols, |col| {
                im2col(g, xg, oh0, r, col);
                // SAFETY: lhs [og, kdim] is `wg`, rhs [kdim, cols] is `col`.
                unsafe {
                    super::sgemm(
                        (og, cols, kdim),
                        dst,
                        (howo, 1),
                        false,
                        wg.as_ptr(),
                        (kdim, 1),
                        col.as_ptr(),
                        (cols, 1),
                        1.0,
                        par,
                    )
                }
            });
        }
    });
    y
}

/// A stride-1 input gradient is itself a convolution: of `dy`, padded by
/// `dilation * (k - 1) - padding`, with the kernel flipped and its two channel
/// axes swapped. That form has the forward pass's long GEMM inner dimension
/// (`O * kh * kw` instead of `O`) and needs no scatter, so it is preferred
/// where it applies. Returns its geometry and weight.
fn as_forward_conv(g: &Geom, w: &[f32]) -> Option<(Geom, Vec<f32>)> {
    if g.stride != 1 || g.kh != g.kw || g.is_pointwise() {
        return None;
    }
    let pad = (g.dil * (g.kh - 1)).checked_sub(g.pad)?;
    let g2 = Geom {
        n: g.n,
        c: g.o,
        h: g.ho,
        w: g.wo,
        o: g.c,
        kh: g.kh,
        kw: g.kw,
        stride: 1,
        pad,
        dil: g.dil,
        groups: g.groups,
        ho: g.h,
        wo: g.w,
    };
    // Output padding of a transposed convolution can make the sizes differ.
    if out_size(g2.h, g2.kh, pad, 1, g2.dil) != Some(g.h)
        || out_size(g2.w, g2.kw, pad, 1, g2.dil) != Some(g.w)
    {
        return None;
    }
    let (cg, og, kk) = (g.cg(), g.og(), g.kk());
    let mut w2 = vec![0f32; w.len()];
    for gi in 0..g.groups {
        for oi in 0..og {
            for ci in 0..cg {
                let src = &w[((gi * og + oi) * cg + ci) * kk..][..kk];
                let dst = &mut w2[((gi * cg + ci) * og + oi) * kk..][..kk];
                for (d, v) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *v;
                }
            }
        }
    }
    Some((g2, w2))
}

/// `dx = conv_input_grad(dy, w)`: `dy [n, o, ho, wo]`, `w [o, c/groups, kh, kw]`
/// -> `[n, c, h, w]`.
fn conv_grad_input(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    if let Some((g2, w2)) = as_forward_conv(g, w) {
        return conv_fwd(&g2, dy, &w2);
    }
    let mut dx = vec![0f32; g.n * g.c * g.hw()];
    let (cg, og, kdim, kk, howo) = (g.cg(), g.og(), g.kdim(), g.kk(), g.howo());
    let dxp = SharedMut(dx.as_mut_ptr());
    if g.is_pointwise() {
        // dX = W^T dY straight into place, tiled over pixels (h == ho here).
        let rows = g.tile_rows(cg);
        let tiles = g.ho.div_ceil(rows);
        for_each_unit(g.n * g.groups * tiles, |_, u, par| {
            let (ng, t) = (u / tiles, u % tiles);
            let (ni, gi) = (ng / g.groups, ng % g.groups);
            let p0 = t * rows * g.wo;
            let cols = (rows * g.wo).min(howo - p0);
            let dyg = &dy[(ni * g.o + gi * og) * howo + p0..];
            let wg = &w[gi * og * cg..][..og * cg];
            // SAFETY: unit writes channels gi*cg.. of image ni, pixels
            // p0..p0+cols only; lhs W^T [cg, og] (strides 1, cg) is in `wg`.
            unsafe {
                let dst = dxp.at((ni * g.c + gi * cg) * g.hw() + p0);
                super::sgemm(
                    (cg, cols, og),
                    dst,
                    (g.hw(), 1),
                    false,
                    wg.as_ptr(),
                    (1, cg),
                    dyg.as_ptr(),
                    (howo, 1),
                    1.0,
                    par,
                )
            }
        });
        return dx;
    }
    // Units own whole input channels (col2im windows overlap across
    // output tiles but never across channels); tiles run in sequence.
    let threads = n_threads();
    let blocks_wanted = (4 * threads).div_ceil(g.n * g.groups);
    let cb = cg.div_ceil(blocks_wanted).max(1);
    let blocks = cg.div_ceil(cb);
    let rows = g.tile_rows(cb * kk);
    for_each_unit(g.n * g.groups * blocks, |_, u, par| {
        let (ng, b) = (u / blocks, u % blocks);
        let (ni, gi) = (ng / g.groups, ng % g.groups);
        let c0 = b * cb;
        let cbn = cb.min(cg - c0);
        let m = cbn * kk;
        // W^T rows c0*kk.. of group gi: element (r, o) at w[(gi*og + o)*kdim + r].
        let wg = &w[gi * og * kdim + c0 * kk..];
        let dyg = &dy[(ni * g.o + gi * og) * howo..][..og * howo];
        // SAFETY: unit (image, group, channel block) is the only writer of
        // channels gi*cg+c0 .. +cbn of image ni.
        let dxc = unsafe {
            std::slice::from_raw_parts_mut(dxp.at((ni * g.c + gi * cg + c0) * g.hw()), cbn * g.hw())
        };
        with_tile(m * rows * g.wo, |col| {
            let mut oh0 = 0;
            while oh0 < g.ho {
                let r = rows.min(g.ho - oh0);
                let cols = r * g.wo;
                let col = &mut col[..m * cols];
                // SAFETY: lhs [m, og] lies in `wg` (last element at
                // (og-1)*kdim + m-1 < og*kdim - c0*kk), rhs [og, cols] in `dyg`.
                unsafe {
                    super::sgemm(
                        (m, cols, og),
                        col.as_mut_ptr(),
                        (cols, 1),
                        false,
                        wg.as_ptr(),
                        (1, kdim),
                        dyg[oh0 * g.wo..].as_ptr(),
                        (howo, 1),
                        1.0,
                        par,
                    )
                }
                col2im_add(g, col, cbn, oh0, r, dxc);
                oh0 += r;
            }
        });
    });
    dx
}

/// `dw = conv_weight_grad(x, dy)`: `x [n, c, h, w]`, `dy [n, o, ho, wo]`
/// -> `[o, c/groups, kh, kw]`.
fn conv_grad_weight(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    if winograd::grad_weight_applies(g) {
        winograd::grad_weight3x3(g, x, dy)
    } else {
        conv_grad_weight_im2col(g, x, dy)
    }
}

/// [`conv_grad_weight`] by im2col + GEMM, for every geometry.
fn conv_grad_weight_im2col(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (cg, og, kdim, howo) = (g.cg(), g.og(), g.kdim(), g.howo());
    let wlen = g.o * kdim;
    let threads = n_threads();
    // One partial sum per thread, reduced at the end.
    let mut partial = vec![0f32; threads * wlen];
    let pp = SharedMut(partial.as_mut_ptr());
    let rows = if g.is_pointwise() {
        g.tile_rows(cg)
    } else {
        g.tile_rows(kdim)
    };
    let tiles = g.ho.div_ceil(rows);
    for_each_unit_static(g.n * g.groups * tiles, |tid, u, par| {
        let (ng, t) = (u / tiles, u % tiles);
        let (ni, gi) = (ng / g.groups, ng % g.groups);
        let oh0 = t * rows;
        let r = rows.min(g.ho - oh0);
        let cols = r * g.wo;
        let xg = &x[(ni * g.c + gi * cg) * g.hw()..][..cg * g.hw()];
        let dyg = &dy[(ni * g.o + gi * og) * howo + oh0 * g.wo..];
        // SAFETY: thread `tid` is the only writer of its partial sum (units
        // of one thread run one after the other).
        let dst = pp.at(tid * wlen + gi * og * kdim);
        if g.is_pointwise() {
            // SAFETY: rhs X^T [cols, cg] (strides 1, hw) lies in `xg`.
            unsafe {
                super::sgemm(
                    (og, cg, cols),
                    dst,
                    (kdim, 1),
                    true,
                    dyg.as_ptr(),
                    (howo, 1),
                    xg[oh0 * g.wo..].as_ptr(),
                    (1, g.hw()),
                    1.0,
                    par,
                )
            }
        } else {
            with_tile(kdim * cols, |col| {
                im2col(g, xg, oh0, r, col);
                // SAFETY: rhs col^T [cols, kdim] (strides 1, cols) is `col`.
                unsafe {
                    super::sgemm(
                        (og, kdim, cols),
                        dst,
                        (kdim, 1),
                        true,
                        dyg.as_ptr(),
                        (howo, 1),
                        col.as_ptr(),
                        (1, cols),
                        1.0,
                        par,
                    )
                }
            });
        }
    });
    let (first, rest) = partial.split_at_mut(wlen);
    for p in rest.chunks_exact(wlen) {
        for (a, b) in first.iter_mut().zip(p) {
            *a += *b;
        }
    }
    partial.truncate(wlen);
    partial
}

// ---------------------------------------------------------------------------
// candle custom ops.
// ---------------------------------------------------------------------------

/// Which map of the convolution `y = conv(x, w)` an op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `(x, w) -> y`.
    Forward,
    /// `(dy, w) -> dx`: also the transposed convolution.
    GradInput,
    /// `(x, dy) -> dw`.
    GradWeight,
}

struct ConvOp {
    geom: Geom,
    kind: Kind,
}

fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    shape: &Shape,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    super::shaped_f32(s, l, Some(shape.dims()), "conv op", what)
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Forward => "ensueno-conv2d",
            Kind::GradInput => "ensueno-conv2d-grad-input",
            Kind::GradWeight => "ensueno-conv2d-grad-weight",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let (out, shape) = match self.kind {
            Kind::Forward => {
                let x = f32_slice(s1, l1, &g.x_shape(), "input")?;
                let w = f32_slice(s2, l2, &g.w_shape(), "weight")?;
                (conv_fwd(g, x, w), g.y_shape())
            }
            Kind::GradInput => {
                let dy = f32_slice(s1, l1, &g.y_shape(), "output gradient")?;
                let w = f32_slice(s2, l2, &g.w_shape(), "weight")?;
                (conv_grad_input(g, dy, w), g.x_shape())
            }
            Kind::GradWeight => {
                let x = f32_slice(s1, l1, &g.x_shape(), "input")?;
                let dy = f32_slice(s2, l2, &g.y_shape(), "output gradient")?;
                (conv_grad_weight(g, x, dy), g.w_shape())
            }
        };
        Ok((CpuStorage::F32(out), shape))
    }

    /// Each map is bilinear in its two arguments, so its gradients are the
    /// other two maps of the same convolution.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = |kind| ConvOp {
            geom: self.geom,
            kind,
        };
        let (ga, gb) = match self.kind {
            // a = x, b = w, grad = dy.
            Kind::Forward => (
                grad.apply_op2_no_bwd(b, &op(Kind::GradInput))?,
                a.apply_op2_no_bwd(&grad, &op(Kind::GradWeight))?,
            ),
            // a = dy, b = w, grad = "dx".
            Kind::GradInput => (
                grad.apply_op2_no_bwd(b, &op(Kind::Forward))?,
                grad.apply_op2_no_bwd(a, &op(Kind::GradWeight))?,
            ),
            // a = x, b = dy, grad = "dw".
            Kind::GradWeight => (
                b.apply_op2_no_bwd(&grad, &op(Kind::GradInput))?,
                a.apply_op2_no_bwd(&grad, &op(Kind::Forward))?,
            ),
        };
        Ok((Some(ga), Some(gb)))
    }
}

/// `conv(x, w) + b`, the bias added in place into the convolution's output
/// and its gradient reduced in the same backward node: one graph node and
/// one output-sized buffer fewer than a separate bias add.
struct ConvBiasOp {
    geom: Geom,
}

impl CustomOp3 for ConvBiasOp {
    fn name(&self) -> &'static str {
        "ensueno-conv2d-bias"
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
        let g = &self.geom;
        let x = f32_slice(s1, l1, &g.x_shape(), "input")?;
        let w = f32_slice(s2, l2, &g.w_shape(), "weight")?;
        let b_shape = if l3.dims().len() == 2 {
            Shape::from((g.n, g.o))
        } else {
            Shape::from(g.o)
        };
        let b = f32_slice(s3, l3, &b_shape, "bias")?;
        let mut y = conv_fwd(g, x, w);
        crate::ops::bias::add_channel_bias_inplace(&mut y, g.ho * g.wo, b);
        Ok((CpuStorage::F32(y), g.y_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = |kind| ConvOp {
            geom: self.geom,
            kind,
        };
        let gx = grad.apply_op2_no_bwd(w, &op(Kind::GradInput))?;
        let gw = x.apply_op2_no_bwd(&grad, &op(Kind::GradWeight))?;
        let gb = crate::ops::bias::plane_bias_grad(&grad, b.rank() == 2)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `conv(x, w) + r` with `r` of the output's shape (the resnet's residual
/// connection), added in place into the convolution's output: one graph node
/// and one output-sized buffer fewer than a separate add.
struct ConvResidualOp {
    geom: Geom,
}

impl CustomOp3 for ConvResidualOp {
    fn name(&self) -> &'static str {
        "ensueno-conv2d-residual"
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
        let g = &self.geom;
        let x = f32_slice(s1, l1, &g.x_shape(), "input")?;
        let w = f32_slice(s2, l2, &g.w_shape(), "weight")?;
        let r = f32_slice(s3, l3, &g.y_shape(), "residual")?;
        let mut y = conv_fwd(g, x, w);
        crate::ops::bias::add_inplace(&mut y, r);
        Ok((CpuStorage::F32(y), g.y_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = |kind| ConvOp {
            geom: self.geom,
            kind,
        };
        let gx = grad.apply_op2_no_bwd(w, &op(Kind::GradInput))?;
        let gw = x.apply_op2_no_bwd(&grad, &op(Kind::GradWeight))?;
        Ok((Some(gx), Some(gw), Some(grad)))
    }
}

/// `conv2d(x, w, None, cfg) + residual`, fused on the fast path.
///
/// # Shapes
/// - `x`: `[N, C, H, W]`, `w`: `[O, C / groups, kh, kw]`
/// - `residual`: the output's shape `[N, O, Ho, Wo]`
/// - returns `[N, O, Ho, Wo]`
pub fn conv2d_add(x: &Tensor, w: &Tensor, residual: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    let geom = conv_geom(x, w, cfg)?;
    if residual.shape() != &geom.y_shape() {
        return Err(Error::Shape {
            what: "convolution residual".into(),
            expected: format!("{:?}", geom.y_shape().dims()),
            got: format!("{:?}", residual.dims()),
        });
    }
    if fast_path(x, w) && residual.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &residual.contiguous()?,
            ConvResidualOp { geom },
        )?);
    }
    Ok((conv2d(x, w, None, cfg)? + residual)?)
}

fn fast_path(x: &Tensor, w: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && w.dtype() == DType::F32
}

fn add_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = b else { return Ok(y) };
    let (n, o) = (y.dim(0)?, y.dim(1)?);
    if b.dims() != [o] && b.dims() != [n, o] {
        return Err(Error::Shape {
            what: "convolution bias".into(),
            expected: format!("[{o}] or [{n}, {o}]"),
            got: format!("{:?}", b.dims()),
        });
    }
    crate::ops::bias::add_plane_bias(&y, b)
}

/// 2D convolution (cross-correlation, as PyTorch), differentiable.
///
/// # Shapes
/// - `x`: `[N, C, H, W]`
/// - `w`: `[O, C / groups, kh, kw]`
/// - `b`: `[O]`, or `[N, O]` for a per-sample bias
/// - returns `[N, O, Ho, Wo]` with `Ho = (H + 2 * padding - dilation * (kh - 1) - 1) / stride + 1`
///   (likewise `Wo`).
///
/// f32 tensors on the CPU take the fast GEMM path; anything else goes
/// through candle's `Tensor::conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, cfg: &Conv2dConfig) -> Result<Tensor> {
    let geom = conv_geom(x, w, cfg)?;
    if let Some(b) = b {
        let bias_ok = b.dims() == [geom.o] || b.dims() == [geom.n, geom.o];
        if fast_path(x, w) && b.dtype() == DType::F32 && bias_ok {
            return Ok(x.contiguous()?.apply_op3(
                &w.contiguous()?,
                &b.contiguous()?,
                ConvBiasOp { geom },
            )?);
        }
    }
    let y = if fast_path(x, w) {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            ConvOp {
                geom,
                kind: Kind::Forward,
            },
        )?
    } else {
        x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?
    };
    add_bias(y, b)
}

/// 2D transposed convolution (PyTorch's `conv_transpose2d`), differentiable.
///
/// # Shapes
/// - `x`: `[N, C_in, H, W]`
/// - `w`: `[C_in, C_out / groups, kh, kw]`
/// - `b`: `[C_out]`
/// - returns `[N, C_out, Hout, Wout]` with
///   `Hout = (H - 1) * stride - 2 * padding + dilation * (kh - 1) + output_padding + 1`
///   (likewise `Wout`).
///
/// f32 tensors on the CPU take the fast GEMM path; anything else goes
/// through candle's `Tensor::conv_transpose2d` (one call per group).
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    cfg: &ConvTranspose2dConfig,
) -> Result<Tensor> {
    let geom = conv_transpose_geom(x, w, cfg)?;
    let y = if fast_path(x, w) {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            ConvOp {
                geom,
                kind: Kind::GradInput,
            },
        )?
    } else {
        let one = |x: &Tensor, w: &Tensor| {
            x.conv_transpose2d(w, cfg.padding, cfg.output_padding, cfg.stride, cfg.dilation)
        };
        if cfg.groups == 1 {
            one(x, w)?
        } else {
            let xs = x.chunk(cfg.groups, 1)?;
            let ws = w.chunk(cfg.groups, 0)?;
            let ys = xs
                .iter()
                .zip(&ws)
                .map(|(x, w)| one(x, w))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&ys, 1)?
        }
    };
    add_bias(y, b)
}

/// The gradient of [`conv2d`] with respect to its weight, on its own (the
/// backward pass of [`conv2d`] calls the same kernel).
///
/// # Shapes
/// - `x`: `[N, C, H, W]`, the convolution's input
/// - `dy`: `[N, O, Ho, Wo]`, the gradient of its output
/// - `kernel`: `(kh, kw)`
/// - returns `[O, C / groups, kh, kw]`
///
/// Only f32 tensors on the CPU are supported.
pub fn conv2d_grad_weight(
    x: &Tensor,
    dy: &Tensor,
    kernel: (usize, usize),
    cfg: &Conv2dConfig,
) -> Result<Tensor> {
    if !fast_path(x, dy) {
        return Err(Error::invalid(format!(
            "conv2d_grad_weight: needs f32 tensors on the CPU, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )));
    }
    let (_, c, _, _) = x.dims4()?;
    let (_, o, _, _) = dy.dims4()?;
    if c % cfg.groups.max(1) != 0 {
        return Err(Error::invalid(format!(
            "conv2d_grad_weight: {c} channels are not divisible by groups {}",
            cfg.groups
        )));
    }
    let w = Tensor::zeros(
        (o, c / cfg.groups.max(1), kernel.0, kernel.1),
        DType::F32,
        x.device(),
    )?;
    let geom = conv_geom(x, &w, cfg)?;
    if dy.dims() != geom.y_shape().dims() {
        return Err(Error::Shape {
            what: "conv2d_grad_weight output gradient".into(),
            expected: format!("{:?}", geom.y_shape().dims()),
            got: format!("{:?}", dy.dims()),
        });
    }
    Ok(x.contiguous()?.apply_op2_no_bwd(
        &dy.contiguous()?,
        &ConvOp {
            geom,
            kind: Kind::GradWeight,
        },
    )?)
}

fn to_candle(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    }
}

/// A convolution layer with the parameters of PyTorch's `nn.Conv2d`
/// (`weight [O, C / groups, k, k]`, optional `bias [O]`), running on
/// [`conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub config: Conv2dConfig,
}

impl Conv2d {
    /// Loads `weight` and `bias` from `vb` with the keys and initialisation
    /// of `candle_nn::conv2d`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        let mut conv = Self::new_no_bias(vb.clone(), in_channels, out_channels, kernel, config)?;
        let bound = 1. / (in_channels as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        conv.bias = Some(vb.get_with_hints(out_channels, "bias", init)?);
        Ok(conv)
    }

    /// Like [`Conv2d::new`] without a bias.
    pub fn new_no_bias(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        check_hyper(
            config.padding,
            config.stride,
            config.dilation,
            config.groups,
        )?;
        if !in_channels.is_multiple_of(config.groups) || !out_channels.is_multiple_of(config.groups)
        {
            return Err(Error::invalid(format!(
                "conv2d: channels {in_channels} -> {out_channels} are not divisible by groups {}",
                config.groups
            )));
        }
        let weight = vb.get_with_hints(
            (out_channels, in_channels / config.groups, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        Ok(Self {
            weight,
            bias: None,
            config,
        })
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// `x [N, C, H, W]` -> `[N, O, Ho, Wo]` (see [`conv2d`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), &self.config)
    }

    /// `forward(x) + extra` with `extra [N, out_channels]` broadcast over the
    /// spatial dims (the resnet's time embedding), fused into the
    /// convolution as a per-sample bias.
    pub fn forward_add(&self, x: &Tensor, extra: &Tensor) -> Result<Tensor> {
        let bias = match &self.bias {
            Some(b) => extra.broadcast_add(&b.unsqueeze(0)?)?,
            None => extra.clone(),
        };
        conv2d(x, &self.weight, Some(&bias), &self.config)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Conv2d::forward(self, x).map_err(to_candle)
    }
}

/// A transposed convolution layer with the parameters of PyTorch's
/// `nn.ConvTranspose2d` (`weight [C_in, C_out / groups, k, k]`, optional
/// `bias [C_out]`), running on [`conv_transpose2d`].
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub config: ConvTranspose2dConfig,
}

impl ConvTranspose2d {
    /// Loads `weight` and `bias` from `vb` with the keys and initialisation
    /// of `candle_nn::conv_transpose2d`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: ConvTranspose2dConfig,
    ) -> Result<Self> {
        let mut conv = Self::new_no_bias(vb.clone(), in_channels, out_channels, kernel, config)?;
        conv.bias =
            Some(vb.get_with_hints(out_channels, "bias", Self::init(out_channels, kernel))?);
        Ok(conv)
    }

    /// Like [`ConvTranspose2d::new`] without a bias.
    pub fn new_no_bias(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: ConvTranspose2dConfig,
    ) -> Result<Self> {
        check_hyper(
            config.padding,
            config.stride,
            config.dilation,
            config.groups,
        )?;
        if !in_channels.is_multiple_of(config.groups) || !out_channels.is_multiple_of(config.groups)
        {
            return Err(Error::invalid(format!(
                "conv_transpose2d: channels {in_channels} -> {out_channels} are not divisible by groups {}",
                config.groups
            )));
        }
        let weight = vb.get_with_hints(
            (in_channels, out_channels / config.groups, kernel, kernel),
            "weight",
            Self::init(out_channels, kernel),
        )?;
        Ok(Self {
            weight,
            bias: None,
            config,
        })
    }

    fn init(out_channels: usize, kernel: usize) -> candle_nn::Init {
        let bound = 1. / (out_channels as f64).sqrt() / kernel as f64;
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        }
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// `x [N, C_in, H, W]` -> `[N, C_out, Hout, Wout]` (see [`conv_transpose2d`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv_transpose2d(x, &self.weight, self.bias.as_ref(), &self.config)
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ConvTranspose2d::forward(self, x).map_err(to_candle)
    }
}

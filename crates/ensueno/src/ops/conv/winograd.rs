//! Winograd minimal filtering F(2x2, 3x3) for 3x3, stride-1 convolutions.
//!
//! Paper: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! CVPR 2016, arXiv:1509.09308. Reference implementations: the F(2x2, 3x3)
//! kernels of NNPACK and oneDNN (`winograd` convolution algorithm).
//!
//! Each 2x2 block of outputs is computed from a 4x4 input patch `d` and the
//! 3x3 filter `g` as `A^T [(G g G^T) ⊙ (B^T d B)] A`. Summed over input
//! channels, the element-wise product becomes 16 independent GEMMs
//! `M[ξ] = U[ξ] V[ξ]` with `U[ξ] [O, C]` (transformed filters) and
//! `V[ξ] [C, tiles]` (transformed patches): 16 multiply-adds per channel pair
//! and 2x2 outputs instead of the 36 of a direct (im2col) convolution, 2.25x
//! fewer, for two cheap linear transforms of the data. Patches are 4x4 (4x
//! the input) where im2col copies 9x, so the memory traffic drops too.
//!
//! The transforms are exact in real arithmetic; in f32 this variant (with
//! the 1/2 entries of `G`) stays within a few ulps of the direct sum times
//! the usual accumulation error, which the tests bound against candle's
//! direct convolution.
//!
//! The weight gradient is the same algorithm transposed:
//! `G^T [(A dY A^T) ⊙ (B^T d B)] G` summed over tiles, 16 GEMMs whose inner
//! dimension is the tile count ([`grad_weight3x3`]).
//!
//! Work is split into units of consecutive tile rows (of one image or
//! several: small images are batched so the GEMMs stay wide), each running
//! its 16 GEMMs single-threaded; in the forward pass units write disjoint
//! output rows, and in the weight gradient each thread sums a fixed range
//! of units and the threads' sums are added in order, so neither result
//! depends on timing (exact training resumes rely on that).

use std::sync::atomic::{AtomicU8, Ordering};

#[cfg(target_arch = "x86_64")]
use super::winograd_avx512;
use super::{for_each_unit, for_each_unit_static, winograd_gemm, with_tile, Geom, SharedMut};
use crate::ops::group_norm::multiversion;

/// Tiles per unit to aim for: enough GEMM columns for the kernels to run at
/// full width, few enough for the transformed patches to stay cache-resident
/// (`ENSUENO_WINOGRAD_TILES` overrides it, for tuning). 192 ran the 28x28
/// and 14x14 layers of the MNIST UNet 10-20% faster than 384 with the
/// direct kernel, and the wide layers of SD 1.5 alike (2026-11-23).
fn tiles_per_unit() -> usize {
    static T: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("ENSUENO_WINOGRAD_TILES")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(192)
    })
}

/// Channel counts below this go through im2col: with few channels the 16
/// GEMMs are too thin to beat one GEMM over 9x as many rows.
const MIN_CHANNELS: usize = 16;

/// Fewer tiles than this (a small image with many channels) would run the
/// 16 GEMMs on too few columns to reuse the transformed filters: on the
/// development machine 2x1280x16x16 (128 tiles) ran 13% slower than im2col,
/// every case from 512 tiles up faster (`examples/bench_winograd.rs`).
const MIN_TILES: usize = 256;

/// Whether `g` is a convolution this module computes (and is worth it).
pub(super) fn applies(g: &Geom) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.dil == 1
        && g.groups == 1
        && g.pad <= 2
        && g.c >= MIN_CHANNELS
        && g.o >= MIN_CHANNELS
        && g.n * g.ho.div_ceil(2) * g.wo.div_ceil(2) >= MIN_TILES
        && enabled()
}

/// Largest total of the weight gradient's per-thread sums (`16 O C` floats
/// per thread): beyond glibc's largest mmap threshold each call maps fresh
/// pages, and their faults cost more than Winograd saves (2x640x32x32 ran
/// 3.5x slower than im2col with 52 MB of sums on 2 threads).
const MAX_GRAD_WEIGHT_SUMS_BYTES: usize = 32 << 20;

/// Input channels below this keep im2col for the weight gradient. At 32
/// input channels (28x28, batch 64, to 32 or 64 outputs) Winograd's ran
/// 7-26% faster than im2col on the development machine once the input
/// transform ran once per input row (before that, 8-15% slower);
/// `examples/bench_winograd.rs`. Fewer channels are not measured.
const MIN_GRAD_WEIGHT_CHANNELS: usize = 32;

/// Whether [`grad_weight3x3`] computes the weight gradient of `g`.
pub(super) fn grad_weight_applies(g: &Geom) -> bool {
    applies(g)
        && g.c >= MIN_GRAD_WEIGHT_CHANNELS
        && 16 * g.o * g.c * super::n_threads() * 4 <= MAX_GRAD_WEIGHT_SUMS_BYTES
}

/// 0: not decided yet (read `ENSUENO_WINOGRAD`), 1: on, 2: off.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether the algorithm is on: by default yes, `ENSUENO_WINOGRAD=0` or
/// [`set_enabled`] turn it off (for comparisons).
fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("ENSUENO_WINOGRAD").map_or(true, |v| v != "0");
            MODE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns the Winograd path on or off for the whole process.
pub fn set_enabled(on: bool) {
    MODE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// `U[ξ][o][c] = (G g G^T)[ξ]` for every filter `g = w[o][c]`, with
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`; in
/// parallel over output channels (wide layers have millions of filters).
fn transform_filters(o: usize, c: usize, w: &[f32]) -> Vec<f32> {
    let oc = o * c;
    let mut u = vec![0f32; 16 * oc];
    let up = SharedMut(u.as_mut_ptr());
    for_each_unit(o, |_, oi, _| {
        for (ci, g) in w[oi * c * 9..][..c * 9].chunks_exact(9).enumerate() {
            // Rows: t = G g (4x3).
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            // Columns: t G^T (4x4).
            for (i, r) in t.iter().enumerate() {
                let v = [
                    r[0],
                    0.5 * (r[0] + r[1] + r[2]),
                    0.5 * (r[0] - r[1] + r[2]),
                    r[2],
                ];
                for (j, &x) in v.iter().enumerate() {
                    // SAFETY: element (ξ, oi, ci) of `u`; unit oi is the
                    // only writer of output channel oi.
                    unsafe { *up.at((i * 4 + j) * oc + oi * c + ci) = x };
                }
            }
        }
    });
    u
}

/// Tile rows per unit: about [`tiles_per_unit`], split further while that
/// leaves four units per thread. Each unit streams all of `U` (16 x O x C)
/// through its GEMMs, so with wide layers a unit keeps at least
/// `O * C / (O + C) / 16` tiles (the point below which, on the development
/// machine, re-reading the filters cost more than the parallel split won:
/// `examples/bench_winograd.rs`). With fewer units than threads, the GEMMs
/// themselves run in parallel.
fn unit_rows(c: usize, o: usize, tw: usize, total: usize, threads: usize) -> usize {
    let min_tiles = (o * c / (o + c) / 16).max(1);
    let rows = tiles_per_unit().max(min_tiles).div_ceil(tw);
    let balanced = total.div_ceil(4 * threads);
    let rows = if balanced * tw >= min_tiles {
        rows.min(balanced)
    } else {
        rows
    };
    rows.clamp(1, total.max(1))
}

/// `y = conv(x, w)` for a geometry accepted by [`applies`]: `x [n, c, h, w]`,
/// `w [o, c, 3, 3]` -> `[n, o, ho, wo]`.
pub(super) fn conv3x3(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (c, o) = (g.c, g.o);
    let (th, tw) = (g.ho.div_ceil(2), g.wo.div_ceil(2));
    // Global tile rows: row `q` is tile row `q % th` of image `q / th`.
    let total = g.n * th;
    let rows = unit_rows(g.c, g.o, tw, total, super::n_threads());
    let units = total.div_ceil(rows);
    let u = transform_filters(o, c, w);
    // Own kernel where the units run one per thread and the filters are
    // few (see winograd_gemm); the `gemm` crate's otherwise (no AVX-512,
    // parallel GEMMs, or wide layers, which need its cache blocking).
    let direct = winograd_gemm::available()
        && units >= super::n_threads()
        && o * c <= winograd_gemm::MAX_FILTERS;
    let packed = direct.then(|| winograd_gemm::pack_filters(o, c, &u));
    // The direct kernel computes whole 8-row panels of M.
    let m_rows = if direct {
        winograd_gemm::padded_rows(o)
    } else {
        o
    };
    // SAFETY: the units' output transforms write every output row of their
    // tile rows, and the units cover all tile rows.
    let mut y = unsafe { crate::ops::uninit_f32(g.n * o * g.ho * g.wo) };
    let yp = SharedMut(y.as_mut_ptr());
    for_each_unit(units, |_, unit, par| {
        let q0 = unit * rows;
        let r = rows.min(total - q0);
        let tiles = r * tw;
        with_unit_buffers((c, m_rows), tw, tiles, |st, v, m, scratch| {
            transform_input(g, x, q0, r, v, scratch, (st.ld, st.v_plane));
            match &packed {
                Some(packed) => winograd_gemm::gemm16(
                    (m_rows, c),
                    (st.ld, st.v_plane, st.m_plane),
                    packed,
                    v,
                    m,
                ),
                None => {
                    for k in 0..16 {
                        // SAFETY: lhs U[k] [o, c], rhs V[k] [c, tiles] and
                        // dst M[k] [o, tiles] (row strides ld) are disjoint,
                        // in-bounds blocks of `u`, `v` and `m`, which only
                        // this unit (thread) touches.
                        unsafe {
                            crate::ops::sgemm(
                                (o, tiles, c),
                                m[k * st.m_plane..].as_mut_ptr(),
                                (st.ld, 1),
                                false,
                                u[k * o * c..].as_ptr(),
                                (c, 1),
                                v[k * st.v_plane..].as_ptr(),
                                (st.ld, 1),
                                1.0,
                                par,
                            )
                        }
                    }
                }
            }
            // SAFETY: this unit writes the output rows of global tile rows
            // q0 .. q0 + r only (every channel).
            unsafe { transform_output(g, m, q0, r, yp, (st.ld, st.m_plane)) };
        });
    });
    y
}

/// Row and plane strides of a unit's transformed data (see winograd_gemm).
struct UnitStrides {
    /// Between rows (channels) of a plane: the tiles, padded.
    ld: usize,
    /// Between the 16 planes of `V` (input channels).
    v_plane: usize,
    /// Between the 16 planes of `M` or `D` (output channels).
    m_plane: usize,
}

/// Runs `f(strides, v, m, scratch)` on this thread's scratch buffer, split
/// into the 16 planes of `V` (`c` rows), the 16 of `M` (`m_rows` rows), and
/// the input transform's scratch, for a unit of `tiles` tiles in rows of
/// `tw`. Rows are padded to whole vectors and planes to an odd number of
/// cache lines (`winograd_gemm::row_stride`, `plane_stride`): the padding
/// costs a few percent of memory and keeps the transforms' stores from
/// colliding in L1.
fn with_unit_buffers<R>(
    (c, m_rows): (usize, usize),
    tw: usize,
    tiles: usize,
    f: impl FnOnce(UnitStrides, &mut [f32], &mut [f32], &mut [f32]) -> R,
) -> R {
    let ld = winograd_gemm::row_stride(tiles);
    let st = UnitStrides {
        ld,
        v_plane: winograd_gemm::plane_stride(c, ld),
        m_plane: winograd_gemm::plane_stride(m_rows, ld),
    };
    with_tile(
        16 * (st.v_plane + st.m_plane) + input_scratch_len(tw, tiles),
        |buf| {
            let (v, rest) = buf.split_at_mut(16 * st.v_plane);
            let (m, scratch) = rest.split_at_mut(16 * st.m_plane);
            f(st, v, m, scratch)
        },
    )
}

/// `dw = conv_weight_grad(x, dy)` for a geometry accepted by
/// [`grad_weight_applies`]:
/// `x [n, c, h, w]`, `dy [n, o, ho, wo]` -> `[o, c, 3, 3]`.
///
/// The transpose of the forward algorithm: the gradient of
/// `A^T [(G g G^T) ⊙ V] A` with respect to `g`, against an output gradient
/// `dY`, is `G^T [(A dY A^T) ⊙ V] G`. Summed over tiles, that is 16 GEMMs
/// `M[ξ] += D[ξ] V[ξ]^T` with `D[ξ] [O, tiles]` (transformed output
/// gradients) and `V[ξ] [C, tiles]` (the forward's transformed patches),
/// whose inner dimension is the tile count; the 3x3 output transform runs
/// once, on the sums. Each thread sums its fixed range of units into its
/// own `M`, and the partial sums are added in thread order, so the result
/// does not depend on timing.
pub(super) fn grad_weight3x3(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (c, o) = (g.c, g.o);
    let (th, tw) = (g.ho.div_ceil(2), g.wo.div_ceil(2));
    let total = g.n * th;
    let threads = super::n_threads();
    let oc = o * c;
    // Every unit adds 16 GEMM results of O x C into its thread's sum: with
    // short units that read-modify-write of M outweighs the multiplications
    // (2x640x32x32 ran 3x slower than im2col with 64-tile units), so a unit
    // spans at least 8 O C / (O + C) tiles, which keeps M's traffic under a
    // quarter of the patches'. Units come in multiples of the thread count:
    // the static split gives each thread the same number.
    let min_tiles = tiles_per_unit().max(8 * oc / (o + c));
    let per_thread = total.div_ceil(threads);
    let rows = min_tiles.div_ceil(tw).clamp(1, per_thread.max(1));
    let units = threads * total.div_ceil(threads * rows);
    let rows = total.div_ceil(units);
    let units = total.div_ceil(rows);
    let mlen = 16 * oc;
    let mut partial = vec![0f32; threads * mlen];
    let pp = SharedMut(partial.as_mut_ptr());
    for_each_unit_static(units, |tid, unit, par| {
        let q0 = unit * rows;
        let r = rows.min(total - q0);
        let tiles = r * tw;
        // The GEMMs' inner dimension is the tile count, so the padding of
        // the rows is never read.
        with_unit_buffers((c, o), tw, tiles, |st, v, d, scratch| {
            let (ld, vp, dp) = (st.ld, st.v_plane, st.m_plane);
            transform_input(g, x, q0, r, v, scratch, (ld, vp));
            transform_grad_output(g, dy, q0, r, d, (ld, dp));
            for k in 0..16 {
                // SAFETY: lhs D[k] [o, tiles] (row stride ld) and rhs
                // V[k]^T [tiles, c] (strides 1, ld) lie in `d` and `v`; dst
                // M[k] [o, c] is in thread `tid`'s partial sum, which only
                // this thread touches (its units run one after the other).
                unsafe {
                    crate::ops::sgemm(
                        (o, c, tiles),
                        pp.at(tid * mlen + k * oc),
                        (c, 1),
                        true,
                        d[k * dp..].as_ptr(),
                        (ld, 1),
                        v[k * vp..].as_ptr(),
                        (1, ld),
                        1.0,
                        par,
                    )
                }
            }
        });
    });
    let (m, rest) = partial.split_at_mut(mlen);
    for p in rest.chunks_exact(mlen) {
        for (a, b) in m.iter_mut().zip(p) {
            *a += *b;
        }
    }
    // dw = G^T M G with G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0],
    // [0, 1/2, 1/2, 1]], for every (o, c).
    let mut dw = vec![0f32; oc * 9];
    for (e, out) in dw.chunks_exact_mut(9).enumerate() {
        let at = |i: usize, j: usize| m[(4 * i + j) * oc + e];
        // Rows: p = G^T M (3x4), kept as its 4 columns.
        let cols: [[f32; 3]; 4] = std::array::from_fn(|j| {
            let (m0, m1, m2, m3) = (at(0, j), at(1, j), at(2, j), at(3, j));
            [m0 + 0.5 * (m1 + m2), 0.5 * (m1 - m2), 0.5 * (m1 + m2) + m3]
        });
        // Columns: p G (3x3).
        for (a, row) in out.chunks_exact_mut(3).enumerate() {
            let [p0, p1, p2, p3] = cols.map(|col| col[a]);
            row[0] = p0 + 0.5 * (p1 + p2);
            row[1] = 0.5 * (p1 - p2);
            row[2] = 0.5 * (p1 + p2) + p3;
        }
    }
    dw
}

multiversion! {
    /// Fills `d[ξ][oi][t]` (at `ξ * plane + oi * ld + t`) with `A dY A^T` of
    /// the 2x2 output-gradient block of
    /// every tile `t` of global tile rows `q0 .. q0 + r` and every output
    /// channel, with `A = [[1, 0], [1, 1], [1, -1], [0, -1]]`; positions past an
    /// odd edge count as zero (their outputs do not exist).
    #[inline(never)]
    fn transform_grad_output_portable(
        g: &Geom,
        dy: &[f32],
        q0: usize,
        r: usize,
        d: &mut [f32],
        strides: (usize, usize),
    ) {
        let (ld, plane) = strides;
        let (o, ho, wo) = (g.o, g.ho, g.wo);
        let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
        // Even and odd columns of the block's two rows, and of A dY's four.
        let mut cols = vec![0f32; 4 * tw];
        let mut rows = vec![0f32; 8 * tw];
        for oi in 0..o {
            for rr in 0..r {
                let q = q0 + rr;
                let (ni, tr) = (q / th, q % th);
                let (top, bottom) = cols.split_at_mut(2 * tw);
                for (dr, dst) in [top, bottom].into_iter().enumerate() {
                    let (even, odd) = dst.split_at_mut(tw);
                    let oh = 2 * tr + dr;
                    if oh >= ho {
                        even.fill(0.0);
                        odd.fill(0.0);
                        continue;
                    }
                    let src = &dy[((ni * o + oi) * ho + oh) * wo..][..wo];
                    odd[tw - 1] = 0.0;
                    for (k, pair) in src.chunks(2).enumerate() {
                        even[k] = pair[0];
                        if let Some(&b) = pair.get(1) {
                            odd[k] = b;
                        }
                    }
                }
                let (e0, rest) = cols.split_at(tw);
                let (o0, rest) = rest.split_at(tw);
                let (e1, o1) = rest.split_at(tw);
                // Rows of A dY: r0, r0 + r1, r0 - r1, -r1, as (even, odd).
                let (re, ro) = rows.split_at_mut(4 * tw);
                for k in 0..tw {
                    re[k] = e0[k];
                    ro[k] = o0[k];
                    re[tw + k] = e0[k] + e1[k];
                    ro[tw + k] = o0[k] + o1[k];
                    re[2 * tw + k] = e0[k] - e1[k];
                    ro[2 * tw + k] = o0[k] - o1[k];
                    re[3 * tw + k] = -e1[k];
                    ro[3 * tw + k] = -o1[k];
                }
                let base = oi * ld + rr * tw;
                for i in 0..4 {
                    let (p, q) = (&re[i * tw..][..tw], &ro[i * tw..][..tw]);
                    let at = |j: usize| (4 * i + j) * plane + base;
                    d[at(0)..][..tw].copy_from_slice(p);
                    for (dst, (&p, &q)) in d[at(1)..][..tw].iter_mut().zip(p.iter().zip(q)) {
                        *dst = p + q;
                    }
                    for (dst, (&p, &q)) in d[at(2)..][..tw].iter_mut().zip(p.iter().zip(q)) {
                        *dst = p - q;
                    }
                    for (dst, &q) in d[at(3)..][..tw].iter_mut().zip(q) {
                        *dst = -q;
                    }
                }
            }
        }
    }
}

/// Fills `D[ξ][oi][t]` with the transformed output gradients of global tile
/// rows `q0 .. q0 + r` ([`transform_grad_output_portable`] says how), with
/// the AVX-512 code where the CPU has it.
fn transform_grad_output(
    g: &Geom,
    dy: &[f32],
    q0: usize,
    r: usize,
    d: &mut [f32],
    strides: (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::group_norm::simd_level() == 2 {
        // SAFETY: AVX-512F detected; the function checks the extents.
        unsafe { winograd_avx512::transform_grad_output(g, dy, q0, r, d, strides) };
        return;
    }
    transform_grad_output_portable(g, dy, q0, r, d, strides)
}

/// A run of a unit's tile rows that lie in one image: rows `tr0 .. tr0 + s`
/// of image `ni`, the unit's rows `rr .. rr + s`.
pub(super) struct Run {
    pub(super) rr: usize,
    pub(super) ni: usize,
    pub(super) tr0: usize,
    pub(super) s: usize,
}

/// The runs of global tile rows `q0 .. q0 + r` (row `q` is tile row
/// `q % th` of image `q / th`), in order.
pub(super) fn runs(q0: usize, r: usize, th: usize) -> impl Iterator<Item = Run> {
    let mut rr = 0;
    std::iter::from_fn(move || {
        (rr < r).then(|| {
            let q = q0 + rr;
            let (ni, tr0) = (q / th, q % th);
            let s = (th - tr0).min(r - rr);
            let run = Run { rr, ni, tr0, s };
            rr += s;
            run
        })
    })
}

/// Scratch length [`transform_input`] needs for units of `tiles` tiles in
/// rows of `tw` tiles: the column-transformed input rows of one channel.
fn input_scratch_len(tw: usize, tiles: usize) -> usize {
    8 * (tiles + tw)
}

/// `(p0 - p2, p1 + p2, p2 - p1, p1 - p3)`: `B^T` applied to four values.
#[inline(always)]
fn bt4(p0: f32, p1: f32, p2: f32, p3: f32) -> [f32; 4] {
    [p0 - p2, p1 + p2, p2 - p1, p1 - p3]
}

/// The column transform of one input row: `out[j * stride + k]` is element
/// `j` of `B^T (p0, p1, p2, p3)` with `p_m` input column `2k - pad + m` of
/// `src` (zero outside it), for the `tw` tiles `k` of the row, one tile at a
/// time (`winograd_avx512` has the vector version).
#[inline(always)]
fn column_transform(src: &[f32], pad: usize, tw: usize, out: &mut [f32], stride: usize) {
    let wd = src.len();
    let px = |col: isize| {
        if col >= 0 && (col as usize) < wd {
            src[col as usize]
        } else {
            0.0
        }
    };
    for k in 0..tw {
        let x0 = 2 * k as isize - pad as isize;
        let vals = bt4(px(x0), px(x0 + 1), px(x0 + 2), px(x0 + 3));
        for (j, val) in vals.into_iter().enumerate() {
            out[j * stride + k] = val;
        }
    }
}

/// Fills `v[ξ][ci][t]` with the transformed patches of global tile rows
/// `q0 .. q0 + r` ([`transform_input_portable`] says how), with the
/// AVX-512 code where the CPU has it.
fn transform_input(
    g: &Geom,
    x: &[f32],
    q0: usize,
    r: usize,
    v: &mut [f32],
    scratch: &mut [f32],
    strides: (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::group_norm::simd_level() == 2 {
        // SAFETY: AVX-512F detected; the function checks the extents.
        unsafe { winograd_avx512::transform_input(g, x, q0, r, v, scratch, strides) };
        return;
    }
    transform_input_portable(g, x, q0, r, v, scratch, strides)
}

/// Writes `A^T M A` of every tile of global tile rows `q0 .. q0 + r` into
/// the output ([`transform_output_portable`] says how), with the AVX-512
/// code where the CPU has it.
///
/// # Safety
/// As [`transform_output_portable`].
unsafe fn transform_output(
    g: &Geom,
    m: &[f32],
    q0: usize,
    r: usize,
    y: SharedMut,
    strides: (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::group_norm::simd_level() == 2 {
        // SAFETY: AVX-512F detected; the rest is the caller's contract.
        unsafe { winograd_avx512::transform_output(g, m, q0, r, y, strides) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { transform_output_portable(g, m, q0, r, y, strides) }
}

multiversion! {
    /// Fills `v[ξ][ci][t]` (at `ξ * plane + ci * ld + t`, `ld >= r * tw`;
    /// columns past the tiles are left as they were) with `B^T d B` of the 4x4 patch of every tile
    /// `t` of global tile rows `q0 .. q0 + r` and every channel, with
    /// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
    ///
    /// Tile row `tr` reads input rows `2 tr - pad .. 2 tr - pad + 4`, so
    /// neighbouring tile rows share two. The column transform (`B^T` along
    /// each row's four columns `2 tc - pad ..`) therefore runs once per input
    /// row, straight from the input (no padded copy), into `ct[par][j][idx]`
    /// where input row `2 (tr0 + idx) - pad + par` of a run of tile rows of
    /// one image starting at `tr0`. In that layout the four rows of every
    /// tile of the run sit at the same offset of `ct[0][j]`, `ct[1][j]`,
    /// `ct[0][j] + tw` and `ct[1][j] + tw`, so the row transform is one flat
    /// loop over all of the run's tiles (full vector width even for rows of
    /// 7 or 14 tiles) that writes each element of `v` once.
    #[inline(never)]
    fn transform_input_portable(
        g: &Geom,
        x: &[f32],
        q0: usize,
        r: usize,
        v: &mut [f32],
        scratch: &mut [f32],
        strides: (usize, usize),
    ) {
        let (ld, plane) = strides;
        let (c, h, wd, pad) = (g.c, g.h, g.w, g.pad);
        let (th, tw) = (g.ho.div_ceil(2), g.wo.div_ceil(2));
        for Run { rr, ni, tr0, s } in runs(q0, r, th) {
            let rows = (s + 1) * tw;
            let ct = &mut scratch[..8 * rows];
            for ci in 0..c {
                let xc = &x[(ni * c + ci) * h * wd..][..h * wd];
                for pr in 0..2 * s + 2 {
                    let (par, idx) = (pr % 2, pr / 2);
                    let at = |j: usize| (par * 4 + j) * rows + idx * tw;
                    let ih = (2 * tr0 + pr) as isize - pad as isize;
                    if ih < 0 || ih >= h as isize {
                        for j in 0..4 {
                            ct[at(j)..][..tw].fill(0.0);
                        }
                        continue;
                    }
                    let src = &xc[ih as usize * wd..][..wd];
                    column_transform(src, pad, tw, &mut ct[at(0)..], rows);
                }
                // Rows: B^T across each tile's four column-transformed rows.
                let len = s * tw;
                let dst0 = rr * tw + ci * ld;
                for j in 0..4 {
                    let e = &ct[j * rows..][..rows];
                    let o = &ct[(4 + j) * rows..][..rows];
                    let (e0, e1, o0, o1) = (&e[..len], &e[tw..][..len], &o[..len], &o[tw..][..len]);
                    let at = |i: usize| (4 * i + j) * plane + dst0;
                    let (lo, hi) = v.split_at_mut(at(2));
                    let (v0, v1) = lo[at(0)..].split_at_mut(4 * plane);
                    let (v2, v3) = hi.split_at_mut(4 * plane);
                    let (v0, v1, v2, v3) = (&mut v0[..len], &mut v1[..len], &mut v2[..len], &mut v3[..len]);
                    for f in 0..len {
                        let [a, b, cc, d] = bt4(e0[f], o0[f], e1[f], o1[f]);
                        v0[f] = a;
                        v1[f] = b;
                        v2[f] = cc;
                        v3[f] = d;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Writes `A^T M A` of every tile into the output, with
    /// `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`; tiles past an odd edge keep only
    /// their in-range outputs. `M[ξ][oi][t]` is at `ξ * plane + oi * ld + t`
    /// (`ld >= r * tw`; the rest of `m` is ignored).
    ///
    /// # Safety
    /// `y` must point to the `[n, o, ho, wo]` output, and the output rows of
    /// global tile rows `q0 .. q0 + r` must be written by no one else.
    #[inline(never)]
    unsafe fn transform_output_portable(
        g: &Geom,
        m: &[f32],
        q0: usize,
        r: usize,
        y: SharedMut,
        strides: (usize, usize),
    ) {
        let (ld, plane) = strides;
        let (o, ho, wo) = (g.o, g.ho, g.wo);
        let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
        let tiles = r * tw;
        // The tiles of one channel are contiguous in every M[ξ], so both
        // stages of A^T M A run over all of the unit's tiles at once (full
        // vector width even for 7- or 14-tile rows); only the final interleave
        // into output rows goes row by row.
        // s[row][j][t] = (A^T M)[row][j] of tile t; out[dr] = (even, odd)
        // output columns of output row dr of every tile.
        let mut s = vec![0f32; 8 * tiles];
        let mut out = vec![0f32; 4 * tiles];
        for oi in 0..o {
            let base = oi * ld;
            let (s0, s1) = s.split_at_mut(4 * tiles);
            for j in 0..4 {
                let m0 = &m[j * plane + base..][..tiles];
                let m1 = &m[(4 + j) * plane + base..][..tiles];
                let m2 = &m[(8 + j) * plane + base..][..tiles];
                let m3 = &m[(12 + j) * plane + base..][..tiles];
                let a = &mut s0[j * tiles..][..tiles];
                let b = &mut s1[j * tiles..][..tiles];
                for k in 0..tiles {
                    a[k] = m0[k] + m1[k] + m2[k];
                    b[k] = m1[k] - m2[k] - m3[k];
                }
            }
            for (sr, dst) in [&*s0, &*s1].into_iter().zip(out.chunks_exact_mut(2 * tiles)) {
                let (a0, rest) = sr.split_at(tiles);
                let (a1, rest) = rest.split_at(tiles);
                let (a2, a3) = rest.split_at(tiles);
                let (even, odd) = dst.split_at_mut(tiles);
                for k in 0..tiles {
                    even[k] = a0[k] + a1[k] + a2[k];
                    odd[k] = a1[k] - a2[k] - a3[k];
                }
            }
            for rr in 0..r {
                let q = q0 + rr;
                let (ni, tr) = (q / th, q % th);
                for (dr, dst) in out.chunks_exact(2 * tiles).enumerate() {
                    let oh = 2 * tr + dr;
                    if oh >= ho {
                        break;
                    }
                    let even = &dst[rr * tw..][..tw];
                    let odd = &dst[tiles + rr * tw..][..tw];
                    // SAFETY: row oh of channel oi of image ni lies inside the
                    // output and belongs to this unit (caller's contract).
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(y.at(((ni * o + oi) * ho + oh) * wo), wo)
                    };
                    let (pairs, last) = row.split_at_mut(wo / 2 * 2);
                    for (pair, (&e, &d)) in pairs.chunks_exact_mut(2).zip(even.iter().zip(odd)) {
                        pair[0] = e;
                        pair[1] = d;
                    }
                    if let Some(x) = last.first_mut() {
                        *x = even[tw - 1];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1f32..1.)).collect()
    }

    /// A 3x3 stride-1 convolution of `[n, c, h, w]` to `o` channels.
    fn geom(n: usize, c: usize, h: usize, w: usize, o: usize, pad: usize) -> Geom {
        Geom {
            n,
            c,
            h,
            w,
            o,
            kh: 3,
            kw: 3,
            stride: 1,
            pad,
            dil: 1,
            groups: 1,
            ho: h + 2 * pad - 2,
            wo: w + 2 * pad - 2,
        }
    }

    /// The portable column transform against the definition (a zero-padded
    /// copy of the row, `B^T` on each tile's four columns): every padding,
    /// widths from one column to three 16-tile chunks. (The AVX-512 code is
    /// checked against the portable code below, over the same widths.)
    #[test]
    fn column_transform_matches_definition() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for pad in 0..=2usize {
            for wd in 1..=40usize {
                let Some(wo) = (wd + 2 * pad).checked_sub(2) else {
                    continue;
                };
                let tw = wo.div_ceil(2);
                let src = random(wd, &mut rng);
                let mut padded = vec![0f32; 2 * tw + 2];
                for (i, &v) in src.iter().enumerate() {
                    if let Some(p) = padded.get_mut(i + pad) {
                        *p = v;
                    }
                }
                let stride = tw + 3;
                let mut want = vec![f32::NAN; 4 * stride];
                for k in 0..tw {
                    let d = &padded[2 * k..2 * k + 4];
                    let v = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]];
                    for (j, x) in v.into_iter().enumerate() {
                        want[j * stride + k] = x;
                    }
                }
                let same = |got: &[f32], what: &str| {
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            a == b || (a.is_nan() && b.is_nan()),
                            "{what}: pad {pad} width {wd}: element {i}: {a} vs {b}"
                        );
                    }
                };
                let mut got = vec![f32::NAN; 4 * stride];
                column_transform(&src, pad, tw, &mut got, stride);
                same(&got, "portable");
            }
        }
    }

    /// Winograd against im2col on the same data, called directly (no global
    /// switch), forward and weight gradient: odd output sizes, paddings 0
    /// to 2, tiles split over units.
    #[test]
    fn matches_im2col() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for (n, c, h, w, o, pad) in [
            (8, 48, 14, 14, 40, 1),
            (3, 16, 9, 17, 24, 0),
            (2, 20, 11, 8, 16, 2),
            (1, 16, 6, 900, 16, 1),
            // Units of two tile rows, most spanning two images.
            (5, 16, 5, 6, 16, 1),
            // Output channels not a multiple of the kernel's 8-row panels,
            // odd output size, filters few enough for the direct kernel.
            (6, 18, 13, 13, 20, 1),
            // Wide enough for the `gemm` crate's kernels (O * C > 128 * 64).
            (2, 136, 12, 12, 72, 1),
        ] {
            let g = geom(n, c, h, w, o, pad);
            let x = random(n * c * h * w, &mut rng);
            let wt = random(o * c * 9, &mut rng);
            let dy = random(n * o * g.ho * g.wo, &mut rng);
            for (what, fast, direct) in [
                (
                    "forward",
                    conv3x3(&g, &x, &wt),
                    super::super::conv_fwd_im2col(&g, &x, &wt),
                ),
                (
                    "weight gradient",
                    grad_weight3x3(&g, &x, &dy),
                    super::super::conv_grad_weight_im2col(&g, &x, &dy),
                ),
            ] {
                let scale = direct.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = fast
                    .iter()
                    .zip(&direct)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-5 * scale,
                    "{g:?}: {what} max error {err} (scale {scale})"
                );
            }
        }
    }

    /// The AVX-512 transforms (input, output, output gradient) against the
    /// portable ones, element for element (same arithmetic, so
    /// bit-identical): units inside one image
    /// and across images, odd sizes, every padding, padded row and plane
    /// strides.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_transforms_match_portable() {
        if crate::ops::group_norm::simd_level() != 2 {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mut cases = vec![
            (3, 5, 9, 7, 3, 1),
            (2, 3, 28, 28, 4, 1),
            (4, 2, 6, 40, 2, 0),
            (2, 2, 11, 8, 5, 2),
        ];
        // Every width from one output column to three 16-tile chunks, for
        // each padding (the column transform's masks and tails).
        for pad in 0..=2 {
            cases
                .extend((3usize.saturating_sub(2 * pad).max(1)..=66).map(|w| (2, 1, 5, w, 1, pad)));
        }
        for (n, c, h, w, o, pad) in cases {
            let g = geom(n, c, h, w, o, pad);
            let (ho, wo) = (g.ho, g.wo);
            let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
            let x = random(n * c * h * w, &mut rng);
            for (q0, r) in [(0, n * th), (1, th), (th - 1, 2)] {
                let tiles = r * tw;
                let ld = winograd_gemm::row_stride(tiles);
                let plane = winograd_gemm::plane_stride(c.max(o), ld);
                let mut a = vec![0f32; 16 * plane];
                let mut b = vec![0f32; 16 * plane];
                let mut scratch = vec![0f32; input_scratch_len(tw, tiles)];
                transform_input_portable(&g, &x, q0, r, &mut a, &mut scratch, (ld, plane));
                // SAFETY: AVX-512F checked above; sizes as required.
                unsafe {
                    winograd_avx512::transform_input(
                        &g,
                        &x,
                        q0,
                        r,
                        &mut b,
                        &mut scratch,
                        (ld, plane),
                    )
                };
                for k in 0..16 {
                    for ci in 0..c {
                        let at = k * plane + ci * ld;
                        assert_eq!(
                            a[at..at + tiles],
                            b[at..at + tiles],
                            "{g:?} unit {q0}+{r}: V[{k}][{ci}]"
                        );
                    }
                }
                let dy = random(n * o * ho * wo, &mut rng);
                let (mut da, mut db) = (vec![0f32; 16 * plane], vec![0f32; 16 * plane]);
                transform_grad_output_portable(&g, &dy, q0, r, &mut da, (ld, plane));
                // SAFETY: AVX-512F checked above.
                unsafe {
                    winograd_avx512::transform_grad_output(&g, &dy, q0, r, &mut db, (ld, plane))
                };
                for k in 0..16 {
                    for oi in 0..o {
                        let at = k * plane + oi * ld;
                        let (p, q) = (&da[at..at + tiles], &db[at..at + tiles]);
                        let same = p.iter().zip(q).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{g:?} unit {q0}+{r}: D[{k}][{oi}]: {p:?} vs {q:?}");
                    }
                }
                let m = random(16 * plane, &mut rng);
                let mut ya = vec![f32::NAN; n * o * ho * wo];
                let mut yb = vec![f32::NAN; n * o * ho * wo];
                // SAFETY: each call is the only writer of its own output.
                unsafe {
                    transform_output_portable(
                        &g,
                        &m,
                        q0,
                        r,
                        SharedMut(ya.as_mut_ptr()),
                        (ld, plane),
                    );
                    winograd_avx512::transform_output(
                        &g,
                        &m,
                        q0,
                        r,
                        SharedMut(yb.as_mut_ptr()),
                        (ld, plane),
                    );
                }
                for (i, (p, q)) in ya.iter().zip(&yb).enumerate() {
                    assert!(
                        p == q || (p.is_nan() && q.is_nan()),
                        "{g:?} unit {q0}+{r}: y[{i}] {p} vs {q}"
                    );
                }
            }
        }
    }
}

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
//! Work is split into units of consecutive tile rows (of one image or
//! several: small images are batched so the GEMMs stay wide), each running
//! its 16 GEMMs single-threaded; units write disjoint output rows and sum
//! nothing across units, so the result does not depend on timing (exact
//! training resumes rely on that).

use std::sync::atomic::{AtomicU8, Ordering};

use super::{for_each_unit, with_tile, Geom, SharedMut};

/// Tiles per unit to aim for: enough GEMM columns for the kernels to run at
/// full width, few enough for the transformed patches to stay cache-resident
/// (`ENSUENO_WINOGRAD_TILES` overrides it, for tuning).
fn tiles_per_unit() -> usize {
    static T: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("ENSUENO_WINOGRAD_TILES")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(384)
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
    let mut y = vec![0f32; g.n * o * g.ho * g.wo];
    let yp = SharedMut(y.as_mut_ptr());
    let row_len = tw + 1;
    for_each_unit(units, |_, unit, par| {
        let q0 = unit * rows;
        let r = rows.min(total - q0);
        let tiles = r * tw;
        with_tile(16 * (c + o) * tiles + 18 * row_len, |buf| {
            let (v, rest) = buf.split_at_mut(16 * c * tiles);
            let (m, scratch) = rest.split_at_mut(16 * o * tiles);
            transform_input(g, x, q0, r, v, scratch);
            for k in 0..16 {
                // SAFETY: lhs U[k] [o, c], rhs V[k] [c, tiles] and dst
                // M[k] [o, tiles] are disjoint, in-bounds blocks of `u`,
                // `v` and `m`, which only this unit (thread) touches.
                unsafe {
                    crate::ops::sgemm(
                        (o, tiles, c),
                        m[k * o * tiles..].as_mut_ptr(),
                        (tiles, 1),
                        false,
                        u[k * o * c..].as_ptr(),
                        (c, 1),
                        v[k * c * tiles..].as_ptr(),
                        (tiles, 1),
                        1.0,
                        par,
                    )
                }
            }
            // SAFETY: this unit writes the output rows of global tile rows
            // q0 .. q0 + r only (every channel); no other unit has them.
            unsafe { transform_output(g, m, q0, r, yp) };
        });
    });
    y
}

/// Fills `v[k][ci][t]` with `B^T d B` of the 4x4 patch of every tile `t` of
/// global tile rows `q0 .. q0 + r` and every channel, with
/// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
///
/// Input rows are loaded split into even and odd padded columns, so that the
/// 4 columns `2tc .. 2tc + 4` of tile `tc` are `e[tc], o[tc], e[tc + 1],
/// o[tc + 1]`: every loop below runs over contiguous slices.
#[inline(never)]
fn transform_input(g: &Geom, x: &[f32], q0: usize, r: usize, v: &mut [f32], scratch: &mut [f32]) {
    let (c, h, wd, pad) = (g.c, g.h, g.w, g.pad);
    let (th, tw) = (g.ho.div_ceil(2), g.wo.div_ceil(2));
    let tiles = r * tw;
    let plane = c * tiles;
    let len = tw + 1;
    // d: 4 input rows as (even, odd) column pairs; t: B^T d, same layout;
    // padded: one zero-padded input row.
    let (d, rest) = scratch[..18 * len].split_at_mut(8 * len);
    let (t, padded) = rest.split_at_mut(8 * len);
    padded.fill(0.0);
    // Padded column p is input column p - pad.
    let (lo, hi) = (pad.min(2 * len), (pad + wd).min(2 * len));
    for ci in 0..c {
        for rr in 0..r {
            let q = q0 + rr;
            let (ni, tr) = (q / th, q % th);
            let xc = &x[(ni * c + ci) * h * wd..][..h * wd];
            let top = 2 * tr as isize - pad as isize;
            for (i, dd) in d.chunks_exact_mut(2 * len).enumerate() {
                let (even, odd) = dd.split_at_mut(len);
                let ih = top + i as isize;
                if ih < 0 || ih >= h as isize {
                    even.fill(0.0);
                    odd.fill(0.0);
                    continue;
                }
                let src = &xc[ih as usize * wd..][..wd];
                padded[lo..hi].copy_from_slice(&src[..hi - lo]);
                for ((e, o), pair) in even
                    .iter_mut()
                    .zip(odd.iter_mut())
                    .zip(padded.chunks_exact(2))
                {
                    *e = pair[0];
                    *o = pair[1];
                }
            }
            let (d0, rest) = d.split_at(2 * len);
            let (d1, rest) = rest.split_at(2 * len);
            let (d2, d3) = rest.split_at(2 * len);
            let (t0, rest) = t.split_at_mut(2 * len);
            let (t1, rest) = rest.split_at_mut(2 * len);
            let (t2, t3) = rest.split_at_mut(2 * len);
            for p in 0..2 * len {
                t0[p] = d0[p] - d2[p];
                t1[p] = d1[p] + d2[p];
                t2[p] = d2[p] - d1[p];
                t3[p] = d1[p] - d3[p];
            }
            let base = ci * tiles + rr * tw;
            for (i, ti) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                let (e, o) = ti.split_at(len);
                let at = |j: usize| (4 * i + j) * plane + base;
                let (lo, hi) = v.split_at_mut(at(2));
                let (v0, v1) = lo[at(0)..].split_at_mut(plane);
                let (v2, v3) = hi.split_at_mut(plane);
                let (v0, v1, v2, v3) = (&mut v0[..tw], &mut v1[..tw], &mut v2[..tw], &mut v3[..tw]);
                let (e0, e1, o0, o1) = (&e[..tw], &e[1..=tw], &o[..tw], &o[1..=tw]);
                for k in 0..tw {
                    v0[k] = e0[k] - e1[k];
                    v1[k] = o0[k] + e1[k];
                    v2[k] = e1[k] - o0[k];
                    v3[k] = o0[k] - o1[k];
                }
            }
        }
    }
}

/// Writes `A^T M A` of every tile into the output, with
/// `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`; tiles past an odd edge keep only
/// their in-range outputs.
///
/// # Safety
/// `y` must point to the `[n, o, ho, wo]` output, and the output rows of
/// global tile rows `q0 .. q0 + r` must be written by no one else.
#[inline(never)]
unsafe fn transform_output(g: &Geom, m: &[f32], q0: usize, r: usize, y: SharedMut) {
    let (o, ho, wo) = (g.o, g.ho, g.wo);
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let tiles = r * tw;
    let plane = o * tiles;
    // s[row][j][tc] = (A^T M)[row][j] of tile tc.
    let mut s = vec![0f32; 8 * tw];
    let mut even = vec![0f32; tw];
    let mut odd = vec![0f32; tw];
    for oi in 0..o {
        for rr in 0..r {
            let q = q0 + rr;
            let (ni, tr) = (q / th, q % th);
            let base = oi * tiles + rr * tw;
            let (s0, s1) = s.split_at_mut(4 * tw);
            for j in 0..4 {
                let m0 = &m[j * plane + base..][..tw];
                let m1 = &m[(4 + j) * plane + base..][..tw];
                let m2 = &m[(8 + j) * plane + base..][..tw];
                let m3 = &m[(12 + j) * plane + base..][..tw];
                let a = &mut s0[j * tw..][..tw];
                let b = &mut s1[j * tw..][..tw];
                for k in 0..tw {
                    a[k] = m0[k] + m1[k] + m2[k];
                    b[k] = m1[k] - m2[k] - m3[k];
                }
            }
            let oh = 2 * tr;
            for (dr, sr) in [&*s0, &*s1].into_iter().enumerate() {
                if oh + dr >= ho {
                    break;
                }
                let (a0, a1, a2, a3) = (
                    &sr[..tw],
                    &sr[tw..2 * tw],
                    &sr[2 * tw..3 * tw],
                    &sr[3 * tw..],
                );
                for k in 0..tw {
                    even[k] = a0[k] + a1[k] + a2[k];
                    odd[k] = a1[k] - a2[k] - a3[k];
                }
                // SAFETY: row oh + dr of channel oi of image ni lies inside
                // the output and belongs to this unit (caller's contract).
                let row = unsafe {
                    std::slice::from_raw_parts_mut(y.at(((ni * o + oi) * ho + oh + dr) * wo), wo)
                };
                for (pair, (&e, &d)) in row.chunks_mut(2).zip(even.iter().zip(&odd)) {
                    pair[0] = e;
                    if let Some(second) = pair.get_mut(1) {
                        *second = d;
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

    /// Winograd against im2col on the same data, called directly (no global
    /// switch): odd output sizes, paddings 0 to 2, tiles split over units.
    #[test]
    fn matches_im2col() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for (n, c, h, w, o, pad) in [
            (8, 48, 14, 14, 40, 1),
            (3, 16, 9, 17, 24, 0),
            (2, 20, 11, 8, 16, 2),
            (1, 16, 6, 900, 16, 1),
        ] {
            let g = Geom {
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
            };
            let x = random(n * c * h * w, &mut rng);
            let wt = random(o * c * 9, &mut rng);
            let fast = conv3x3(&g, &x, &wt);
            let direct = super::super::conv_fwd_im2col(&g, &x, &wt);
            let scale = direct.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = fast
                .iter()
                .zip(&direct)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5 * scale,
                "{g:?}: max error {err} (scale {scale})"
            );
        }
    }
}

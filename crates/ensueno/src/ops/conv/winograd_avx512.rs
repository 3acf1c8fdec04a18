//! AVX-512 versions of the Winograd F(2x2, 3x3) input and output transforms
//! of [`super::winograd`] (same layouts, same arithmetic, so the results are
//! bit-identical to the portable code).
//!
//! Paper: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! arXiv:1509.09308. The portable loops spent most of their time outside the
//! arithmetic: a column-transform call per input row that recomputed its
//! padding masks (rows of 14 tiles are one vector, so per-call work was most
//! of the work), scalar tails on every row of the row transform, and a
//! scalar even/odd interleave of every output element. Here the masks are
//! computed once per call, tails are masked vector operations, and the
//! interleave is two two-source permutes per 32 outputs.

use std::arch::x86_64::*;

use super::winograd::{runs, Run};
use super::{Geom, SharedMut};

/// Lanes `l < lanes` whose column `col + l` lies in `0..wd`.
fn lane_mask(col: isize, lanes: isize, wd: isize) -> u16 {
    let lo = (-col).clamp(0, lanes);
    let hi = (wd - col).clamp(lo, lanes);
    (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
}

/// The first `n` lanes (`n <= 16`).
fn first(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// The loads and store of one 16-tile chunk of an input row.
#[derive(Clone, Copy)]
struct Chunk {
    /// First input column read (may be negative: left padding).
    base: isize,
    /// Masks of the three loads (columns base.., base+16.., base+32..).
    loads: [u16; 3],
    /// Tiles of the chunk that exist.
    store: u16,
}

/// [`super::winograd`]'s `transform_input` (see there for the layouts).
///
/// # Safety
/// AVX-512F must be present. `v` holds row `(ξ, ci)` at `ξ * plane + ci *
/// ld` (checked: `ld >= r * tw`, `plane >= C * ld`, `v` long enough), and
/// `scratch` at least `8 * (r * tw + tw)` floats (checked).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transform_input(
    g: &Geom,
    x: &[f32],
    q0: usize,
    r: usize,
    v: &mut [f32],
    scratch: &mut [f32],
    (ld, plane): (usize, usize),
) {
    let (c, h, wd, pad) = (g.c, g.h, g.w, g.pad);
    let (th, tw) = (g.ho.div_ceil(2), g.wo.div_ceil(2));
    assert!(ld >= r * tw && plane >= c * ld && v.len() >= 15 * plane + c * ld);
    assert!(scratch.len() >= 8 * (r * tw + tw));
    let chunks: Vec<Chunk> = (0..tw.div_ceil(16))
        .map(|q| {
            let base = 32 * q as isize - pad as isize;
            Chunk {
                base,
                loads: [
                    lane_mask(base, 16, wd as isize),
                    lane_mask(base + 16, 16, wd as isize),
                    lane_mask(base + 32, 2, wd as isize),
                ],
                store: first(tw - 16 * q),
            }
        })
        .collect();
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let lane1 = _mm512_set1_epi32(1);
    let ctp = scratch.as_mut_ptr();
    let vp = v.as_mut_ptr();
    for Run { rr, ni, tr0, s } in runs(q0, r, th) {
        let rows = (s + 1) * tw;
        for ci in 0..c {
            let xc = x[(ni * c + ci) * h * wd..][..h * wd].as_ptr();
            // Columns: B^T across each tile's four columns, for each of the
            // run's input rows, into ct[par][j][idx * tw + tile].
            for pr in 0..2 * s + 2 {
                let (par, idx) = (pr % 2, pr / 2);
                // SAFETY (this block): ct rows lie in `scratch` (8 rows of
                // `rows <= r * tw + tw` floats); input reads are masked to
                // the row's `wd` columns.
                unsafe {
                    let dst = ctp.add(par * 4 * rows + idx * tw);
                    let ih = (2 * tr0 + pr) as isize - pad as isize;
                    if ih < 0 || ih >= h as isize {
                        for (k, ch) in chunks.iter().enumerate() {
                            for j in 0..4 {
                                _mm512_mask_storeu_ps(
                                    dst.add(j * rows + 16 * k),
                                    ch.store,
                                    _mm512_setzero_ps(),
                                );
                            }
                        }
                        continue;
                    }
                    let src = xc.add(ih as usize * wd);
                    for (k, ch) in chunks.iter().enumerate() {
                        let p = src.wrapping_offset(ch.base);
                        let l0 = _mm512_maskz_loadu_ps(ch.loads[0], p);
                        let l1 = _mm512_maskz_loadu_ps(ch.loads[1], p.wrapping_add(16));
                        let l2 = _mm512_maskz_loadu_ps(ch.loads[2], p.wrapping_add(32));
                        // a[t], b[t]: columns base + 2t, base + 2t + 1; a2, b2
                        // the same one tile on.
                        let a = _mm512_permutex2var_ps(l0, even, l1);
                        let b = _mm512_permutex2var_ps(l0, odd, l1);
                        let b_hi = _mm512_permutexvar_ps(lane1, l2);
                        let a2 = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                            _mm512_castps_si512(l2),
                            _mm512_castps_si512(a),
                        ));
                        let b2 = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                            _mm512_castps_si512(b_hi),
                            _mm512_castps_si512(b),
                        ));
                        let d = dst.add(16 * k);
                        _mm512_mask_storeu_ps(d, ch.store, _mm512_sub_ps(a, a2));
                        _mm512_mask_storeu_ps(d.add(rows), ch.store, _mm512_add_ps(b, a2));
                        _mm512_mask_storeu_ps(d.add(2 * rows), ch.store, _mm512_sub_ps(a2, b));
                        _mm512_mask_storeu_ps(d.add(3 * rows), ch.store, _mm512_sub_ps(b, b2));
                    }
                }
            }
            // Rows: B^T across each tile's four column-transformed rows.
            let len = s * tw;
            let dst0 = rr * tw + ci * ld;
            for j in 0..4 {
                // SAFETY: reads of ct rows j and 4 + j at offsets < len + tw
                // <= rows; writes of v rows (4i + j, ci) at dst0 + f < ld.
                unsafe {
                    let e = ctp.add(j * rows);
                    let o = ctp.add((4 + j) * rows);
                    let out = vp.add(j * plane + dst0);
                    let mut f = 0;
                    while f < len {
                        let m = first(len - f);
                        let e0 = _mm512_maskz_loadu_ps(m, e.add(f));
                        let e1 = _mm512_maskz_loadu_ps(m, e.add(tw + f));
                        let o0 = _mm512_maskz_loadu_ps(m, o.add(f));
                        let o1 = _mm512_maskz_loadu_ps(m, o.add(tw + f));
                        let d = out.add(f);
                        _mm512_mask_storeu_ps(d, m, _mm512_sub_ps(e0, e1));
                        _mm512_mask_storeu_ps(d.add(4 * plane), m, _mm512_add_ps(o0, e1));
                        _mm512_mask_storeu_ps(d.add(8 * plane), m, _mm512_sub_ps(e1, o0));
                        _mm512_mask_storeu_ps(d.add(12 * plane), m, _mm512_sub_ps(o0, o1));
                        f += 16;
                    }
                }
            }
        }
    }
}

/// [`super::winograd`]'s `transform_output` (see there for the layouts).
///
/// # Safety
/// AVX-512F must be present; `M[ξ][oi]` lies at `ξ * plane + oi * ld`
/// (checked: `ld >= r * tw`, `plane >= O * ld`, `m` long enough); `y` as
/// the portable version requires.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transform_output(
    g: &Geom,
    m: &[f32],
    q0: usize,
    r: usize,
    y: SharedMut,
    (ld, plane): (usize, usize),
) {
    let (o, ho, wo) = (g.o, g.ho, g.wo);
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let tiles = r * tw;
    assert!(ld >= tiles && plane >= o * ld && m.len() >= 15 * plane + o * ld);
    // out[dr][parity][t]: even and odd output columns of output row dr of
    // tile t.
    let mut out = vec![0f32; 4 * tiles];
    let op = out.as_mut_ptr();
    let mp = m.as_ptr();
    let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for oi in 0..o {
        let mut f = 0;
        while f < tiles {
            let mask = first(tiles - f);
            // SAFETY: M reads at (ξ, oi, f..) lie inside `m` (masked to the
            // tiles); `out` writes inside its 4 rows of `tiles`.
            unsafe {
                let at = |k: usize| _mm512_maskz_loadu_ps(mask, mp.add(k * plane + oi * ld + f));
                // A^T M: rows s0 = M0 + M1 + M2, s1 = M1 - M2 - M3 (of the
                // 4x4 blocks' rows), per column j.
                let s0: [__m512; 4] = std::array::from_fn(|j| {
                    _mm512_add_ps(_mm512_add_ps(at(j), at(4 + j)), at(8 + j))
                });
                let s1: [__m512; 4] = std::array::from_fn(|j| {
                    _mm512_sub_ps(_mm512_sub_ps(at(4 + j), at(8 + j)), at(12 + j))
                });
                // (A^T M) A: even = c0 + c1 + c2, odd = c1 - c2 - c3.
                for (dr, sr) in [s0, s1].iter().enumerate() {
                    let even = _mm512_add_ps(_mm512_add_ps(sr[0], sr[1]), sr[2]);
                    let odd = _mm512_sub_ps(_mm512_sub_ps(sr[1], sr[2]), sr[3]);
                    _mm512_mask_storeu_ps(op.add(2 * dr * tiles + f), mask, even);
                    _mm512_mask_storeu_ps(op.add((2 * dr + 1) * tiles + f), mask, odd);
                }
            }
            f += 16;
        }
        for rr in 0..r {
            let q = q0 + rr;
            let (ni, tr) = (q / th, q % th);
            for dr in 0..2 {
                let oh = 2 * tr + dr;
                if oh >= ho {
                    break;
                }
                // SAFETY: row oh of channel oi of image ni is inside the
                // output and belongs to this unit (caller's contract); the
                // reads stay inside `out`.
                unsafe {
                    let row = y.at(((ni * o + oi) * ho + oh) * wo);
                    let even = op.add(2 * dr * tiles + rr * tw);
                    let odd = op.add((2 * dr + 1) * tiles + rr * tw);
                    let mut k = 0;
                    while k < tw {
                        let e = _mm512_maskz_loadu_ps(first(tw - k), even.add(k));
                        let d = _mm512_maskz_loadu_ps(first(tw - k), odd.add(k));
                        let cols = wo - 2 * k;
                        let dst = row.add(2 * k);
                        _mm512_mask_storeu_ps(
                            dst,
                            first(cols),
                            _mm512_permutex2var_ps(e, lo_idx, d),
                        );
                        if cols > 16 {
                            _mm512_mask_storeu_ps(
                                dst.add(16),
                                first(cols - 16),
                                _mm512_permutex2var_ps(e, hi_idx, d),
                            );
                        }
                        k += 16;
                    }
                }
            }
        }
    }
}

/// [`super::winograd`]'s `transform_grad_output` (see there for the
/// layouts): `D[ξ][oi][t]` at `ξ * plane + oi * ld + t`.
///
/// # Safety
/// AVX-512F must be present (the extents are checked).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transform_grad_output(
    g: &Geom,
    dy: &[f32],
    q0: usize,
    r: usize,
    d: &mut [f32],
    (ld, plane): (usize, usize),
) {
    let (o, ho, wo) = (g.o, g.ho, g.wo);
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    assert!(ld >= r * tw && plane >= o * ld && d.len() >= 15 * plane + o * ld);
    assert!(dy.len() >= g.n * o * ho * wo);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let dp = d.as_mut_ptr();
    let yp = dy.as_ptr();
    for oi in 0..o {
        for rr in 0..r {
            let q = q0 + rr;
            let (ni, tr) = (q / th, q % th);
            let mut k = 0;
            while k < tw {
                let cols = wo - 2 * k;
                // Even and odd columns of the block's two output rows
                // (zero past the edges).
                let split = |dr: usize| {
                    let oh = 2 * tr + dr;
                    if oh >= ho {
                        return (_mm512_setzero_ps(), _mm512_setzero_ps());
                    }
                    // SAFETY: masked to the row's `wo` columns, inside `dy`
                    // (checked above).
                    unsafe {
                        let src = yp.add(((ni * o + oi) * ho + oh) * wo + 2 * k);
                        let lo = _mm512_maskz_loadu_ps(first(cols), src);
                        let hi = _mm512_maskz_loadu_ps(
                            first(cols.saturating_sub(16)),
                            src.wrapping_add(16),
                        );
                        (
                            _mm512_permutex2var_ps(lo, even, hi),
                            _mm512_permutex2var_ps(lo, odd, hi),
                        )
                    }
                };
                let ((e0, o0), (e1, o1)) = (split(0), split(1));
                // Sign flip, as the portable code's unary minus (so -0.0
                // where it gives -0.0).
                let neg = |v: __m512| {
                    _mm512_castsi512_ps(_mm512_xor_si512(
                        _mm512_castps_si512(v),
                        _mm512_set1_epi32(i32::MIN),
                    ))
                };
                // Rows of A dY: r0, r0 + r1, r0 - r1, -r1, as (even, odd).
                let rows = [
                    (e0, o0),
                    (_mm512_add_ps(e0, e1), _mm512_add_ps(o0, o1)),
                    (_mm512_sub_ps(e0, e1), _mm512_sub_ps(o0, o1)),
                    (neg(e1), neg(o1)),
                ];
                let m = first(tw - k);
                for (i, &(p, q)) in rows.iter().enumerate() {
                    let vals = [p, _mm512_add_ps(p, q), _mm512_sub_ps(p, q), neg(q)];
                    for (j, val) in vals.into_iter().enumerate() {
                        // SAFETY: D[4i + j][oi][rr * tw + k ..] for the
                        // chunk's tiles, inside `d` (checked above).
                        unsafe {
                            _mm512_mask_storeu_ps(
                                dp.add((4 * i + j) * plane + oi * ld + rr * tw + k),
                                m,
                                val,
                            )
                        };
                    }
                }
                k += 16;
            }
        }
    }
}

//! The 16 small GEMMs of a Winograd F(2x2, 3x3) unit, `M[ξ] = U[ξ] V[ξ]`,
//! with an AVX-512 register-blocked kernel that reads the transformed
//! patches where the input transform wrote them.
//!
//! Technique: the GotoBLAS/BLIS register-blocked microkernel (Goto & van de
//! Geijn, "Anatomy of High-Performance Matrix Multiplication", ACM TOMS
//! 2008; Van Zee & van de Geijn, "BLIS", ACM TOMS 2015), as in the `gemm`
//! crate's f32 kernels, without the panel packing: here `V[ξ]` is already a
//! row-major `[C, ld]` block in cache, written by the input transform a
//! moment before, so a general GEMM's copy of it into packed panels (a read
//! and a write of every transformed patch per call, about as much memory
//! traffic as the transform itself) buys nothing. Only the filters are
//! packed, once per convolution, into 8-row panels whose 8 values per input
//! channel are one 32-byte load apart.
//!
//! The kernel computes an 8 x 32 block of `M` (8 output channels, 32 tiles:
//! 16 accumulators of 16 lanes) with one broadcast per filter value and two
//! vector loads per input channel; for each 32-tile column block it runs
//! every 8-channel panel while that block of `V` (C x 32 floats) stays in
//! L1.

/// Largest `O * C` this kernel is used for. Its loops do not block the input
/// channels for the caches, so wide layers stream the filters from L2 or
/// beyond for every 32-tile column block; measured on the development
/// machine (`examples/bench_winograd.rs`, 2 threads, forward), it beat the
/// `gemm` crate's packed kernels by 10-25% up to 128 x 64, tied at 128 x 128
/// and lost 15% at 256 x 128 and 25-55% at 320 x 320 and 640 x 640.
pub(super) const MAX_FILTERS: usize = 128 * 64;

/// Output channels per panel (rows of the register block).
pub(super) const MR: usize = 8;

/// Tiles per vector; the row stride `ld` of `V` and `M` is a multiple of it.
pub(super) const LANES: usize = 16;

/// Whether [`gemm16`] is used: the CPU has AVX-512F, and
/// `ENSUENO_WINOGRAD_GEMM=0` does not turn it off (for comparisons with the
/// `gemm` crate's kernels, as in the MAX_FILTERS measurements).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        crate::ops::group_norm::simd_level() == 2
            && !*OFF.get_or_init(|| std::env::var("ENSUENO_WINOGRAD_GEMM").is_ok_and(|v| v == "0"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The row stride of `V` and `M` for `tiles` tiles: whole vectors, and an
/// odd number of them, so that the rows of a column block (one cache line
/// pair per input channel) spread over all of L1's sets instead of the few
/// that a stride of a multiple of 128 bytes maps to.
pub(super) fn row_stride(tiles: usize) -> usize {
    let vectors = tiles.div_ceil(LANES);
    (vectors | 1) * LANES
}

/// The distance between the 16 planes `V[ξ]` (or `M[ξ]`) of `rows` rows of
/// `ld` floats: at least `rows * ld`, and an odd number of cache lines.
/// With `rows * ld * 4` bytes a multiple of 4096 (64 channels of any
/// [`row_stride`]), the same element of all 16 planes would fall in one L1
/// set, and the transforms, which write 4 planes at a time, would evict
/// their own lines.
pub(super) fn plane_stride(rows: usize, ld: usize) -> usize {
    let lines = (rows * ld).div_ceil(LANES);
    (lines | 1) * LANES
}

/// Output channels rounded up to whole panels.
pub(super) fn padded_rows(o: usize) -> usize {
    o.div_ceil(MR) * MR
}

/// Packs the transformed filters `u[ξ][o][c]` (`16 x O x C`) into panels:
/// element `(ξ, o, c)` goes to `((ξ * O' / MR + o / MR) * C + c) * MR + o % MR`
/// with `O' =` [`padded_rows`]`(O)`; the padding rows are zero.
pub(super) fn pack_filters(o: usize, c: usize, u: &[f32]) -> Vec<f32> {
    let op = padded_rows(o);
    let mut packed = vec![0f32; 16 * op * c];
    for k in 0..16 {
        for oi in 0..o {
            let (panel, lane) = (oi / MR, oi % MR);
            let src = &u[(k * o + oi) * c..][..c];
            let dst = &mut packed[(k * op / MR + panel) * c * MR..][..c * MR];
            for (ci, &x) in src.iter().enumerate() {
                dst[ci * MR + lane] = x;
            }
        }
    }
    packed
}

/// `M[ξ][o][t] = Σ_c U[ξ][o][c] V[ξ][c][t]` for all 16 `ξ`, every row `o`
/// of the padded filters (`op =` [`padded_rows`]`(O)`) and every column
/// `t < ld`: `packed` from [`pack_filters`]; `V[ξ][c]` at
/// `ξ * v_plane + c * ld` in `v`, `M[ξ][o]` at `ξ * m_plane + o * ld` in
/// `m`. Columns past the real tiles compute garbage that the caller
/// ignores.
///
/// # Panics
/// If [`available`] is false, `ld` is not a multiple of [`LANES`], or a
/// slice is shorter than the strides say.
pub(super) fn gemm16(
    (op, c): (usize, usize),
    (ld, v_plane, m_plane): (usize, usize, usize),
    packed: &[f32],
    v: &[f32],
    m: &mut [f32],
) {
    assert!(available(), "winograd_gemm: needs AVX-512F");
    assert!(ld % LANES == 0 && op % MR == 0 && v_plane >= c * ld && m_plane >= op * ld);
    assert!(packed.len() >= 16 * op * c);
    assert!(v.len() >= 15 * v_plane + c * ld && m.len() >= 15 * m_plane + op * ld);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted), and the slices hold the
    // blocks every kernel call reads and writes (asserted above).
    unsafe {
        gemm16_avx512(
            (op, c),
            (ld, v_plane, m_plane),
            packed.as_ptr(),
            v.as_ptr(),
            m.as_mut_ptr(),
        )
    }
}

/// # Safety
/// AVX-512F; `packed`, `v` and `m` valid for the extents [`gemm16`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm16_avx512(
    (op, c): (usize, usize),
    (ld, v_plane, m_plane): (usize, usize, usize),
    packed: *const f32,
    v: *const f32,
    m: *mut f32,
) {
    let panels = op / MR;
    for k in 0..16 {
        // SAFETY (all offsets): inside the extents the caller guarantees.
        let (uk, vk, mk) = unsafe {
            (
                packed.add(k * op * c),
                v.add(k * v_plane),
                m.add(k * m_plane),
            )
        };
        let mut t0 = 0;
        while t0 < ld {
            let wide = t0 + 2 * LANES <= ld;
            for p in 0..panels {
                // SAFETY: panel p of U[ξ], columns t0.. of V[ξ] and of rows
                // p*MR.. of M[ξ], all inside the blocks.
                unsafe {
                    let (a, b, d) = (uk.add(p * MR * c), vk.add(t0), mk.add(p * MR * ld + t0));
                    if wide {
                        kernel::<2>(c, a, b, ld, d)
                    } else {
                        kernel::<1>(c, a, b, ld, d)
                    }
                }
            }
            t0 += if wide { 2 * LANES } else { LANES };
        }
    }
}

/// `d[i][j] = Σ_c a[c][i] b[c][j]` for `i < MR`, `j < N * LANES`, rows of
/// `b` and `d` `ld` apart.
///
/// # Safety
/// AVX-512F; `a` valid for `c * MR` reads, `b` for rows `0..c` of
/// `N * LANES` floats, `d` for `MR` rows of `N * LANES` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel<const N: usize>(c: usize, a: *const f32, b: *const f32, ld: usize, d: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); N]; MR];
    for ci in 0..c {
        // SAFETY: row ci of b and values ci*MR.. of a (caller's contract).
        unsafe {
            let row = b.add(ci * ld);
            let bv: [__m512; N] = std::array::from_fn(|j| _mm512_loadu_ps(row.add(j * LANES)));
            let ap = a.add(ci * MR);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                for (acc_ij, &bj) in acc_i.iter_mut().zip(&bv) {
                    *acc_ij = _mm512_fmadd_ps(av, bj, *acc_ij);
                }
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        for (j, &x) in acc_i.iter().enumerate() {
            // SAFETY: row i, vector j of the d block (caller's contract).
            unsafe { _mm512_storeu_ps(d.add(i * ld + j * LANES), x) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Against a plain triple loop: output channels not a multiple of the
    /// panel height, widths with and without a 16-tile tail.
    #[test]
    fn matches_naive_product() {
        if !available() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (o, c, ld) in [(8, 1, 16), (20, 17, 48), (32, 64, 64), (3, 5, 16)] {
            let u: Vec<f32> = (0..16 * o * c)
                .map(|_| rng.random_range(-1f32..1.))
                .collect();
            let v: Vec<f32> = (0..16 * c * ld)
                .map(|_| rng.random_range(-1f32..1.))
                .collect();
            let op = padded_rows(o);
            let packed = pack_filters(o, c, &u);
            let mut m = vec![f32::NAN; 16 * op * ld];
            gemm16((op, c), (ld, c * ld, op * ld), &packed, &v, &mut m);
            for k in 0..16 {
                for oi in 0..op {
                    for t in 0..ld {
                        let want: f64 = if oi < o {
                            (0..c)
                                .map(|ci| {
                                    u[(k * o + oi) * c + ci] as f64
                                        * v[(k * c + ci) * ld + t] as f64
                                })
                                .sum()
                        } else {
                            0.0
                        };
                        let got = m[(k * op + oi) * ld + t] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (c as f64),
                            "o {o} c {c} ld {ld}: M[{k}][{oi}][{t}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}

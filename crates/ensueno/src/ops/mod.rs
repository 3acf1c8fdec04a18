//! Fast CPU kernels as candle custom ops, with forward and backward passes.
//!
//! candle's own CPU convolution, normalisation and attention are general but
//! slow; these kernels take the hot paths of diffusion models (f32,
//! contiguous, on the CPU) and fall back to candle's composite ops everywhere
//! else (CUDA, f16/bf16), so models can call them unconditionally.

pub mod adamw;
pub mod attention;
pub mod batch_norm;
pub mod bias;
pub mod conv;
pub mod geglu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;

/// The data of a contiguous f32 CPU tensor, or an error naming the op and
/// the argument: every custom op of this module checks its inputs so.
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    shaped_f32(s, l, None, op, what)
}

/// [`contiguous_f32`], also checking the shape when `dims` is given.
pub(crate) fn shaped_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    dims: Option<&[usize]>,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    if let Some(dims) = dims.filter(|d| *d != l.dims()) {
        candle_core::bail!("{op}: {what} has shape {:?}, expected {dims:?}", l.dims())
    }
    let candle_core::CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// A vector of `len` floats left uninitialised, for kernels that write every
/// element: zero-filling a large output first costs about as much as one
/// more pass of the kernel over it (5% of a training step's time went to
/// such fills). candle allocates its own op outputs the same way.
///
/// # Safety
/// The caller must write every element before reading any and before the
/// vector leaves its hands.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn uninit_f32(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; initialising is the caller's duty.
    unsafe { v.set_len(len) };
    v
}

/// `dst[m, n] = lhs[m, k] * rhs[k, n]`, or `dst += beta * lhs * rhs` when
/// `accumulate`; strides in elements (rows, columns). One wrapper over
/// `gemm::gemm` for every kernel of this module.
///
/// # Safety
/// Every pointer must be valid for the elements its strides address, and
/// `dst` must not be written concurrently by anyone else.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

//! Micro-benchmark of the fast CPU convolutions against candle's own ops.
//!
//! `cargo run --release -p ensueno --example bench_conv` prints, for each
//! case, the median time and GFLOP/s (2 * N * O * C/groups * kh * kw * Ho * Wo
//! flops, the same count for the forward and both gradients) of ours and of
//! candle 0.11. Set `BENCH_ITERS` to change the number of timed runs.

use std::time::Instant;

use candle_core::{Device, Tensor};
use ensueno::ops::conv::{
    conv2d, conv2d_grad_weight, conv_transpose2d, Conv2dConfig, ConvTranspose2dConfig,
};

fn median_ms(iters: usize, mut f: impl FnMut() -> anyhow::Result<Tensor>) -> anyhow::Result<f64> {
    f()?; // warm-up: buffers, thread pool, page faults
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        let t = f()?;
        // Make sure the work is done (candle's CPU ops are synchronous).
        drop(t);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn report(name: &str, flops: f64, ours: f64, candle: f64) {
    println!(
        "{name:<48} ours {ours:>8.2} ms {:>7.1} GFLOP/s | candle {candle:>8.2} ms {:>7.1} GFLOP/s | x{:.1}",
        flops / ours / 1e6,
        flops / candle / 1e6,
        candle / ours
    );
}

fn randn(shape: &[usize]) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, 1., shape, &Device::Cpu)?)
}

/// conv2d forward, grad input, grad weight of one layer.
#[allow(clippy::too_many_arguments)]
fn conv_case(
    name: &str,
    (n, c, h, w): (usize, usize, usize, usize),
    o: usize,
    k: usize,
    pad: usize,
    stride: usize,
    grads: bool,
    iters: usize,
) -> anyhow::Result<()> {
    let cfg = Conv2dConfig {
        padding: pad,
        stride,
        ..Default::default()
    };
    let x = randn(&[n, c, h, w])?;
    let wt = randn(&[o, c, k, k])?;
    let y = x.conv2d(&wt, pad, stride, 1, 1)?;
    let (ho, wo) = (y.dim(2)?, y.dim(3)?);
    let flops = 2.0 * (n * o * c * k * k * ho * wo) as f64;
    let ours = median_ms(iters, || Ok(conv2d(&x, &wt, None, &cfg)?))?;
    let theirs = median_ms(iters, || Ok(x.conv2d(&wt, pad, stride, 1, 1)?))?;
    report(&format!("{name} fwd"), flops, ours, theirs);
    if !grads {
        return Ok(());
    }
    let dy = randn(y.dims())?;
    // The input gradient is the transposed convolution of dy.
    let out_pad = h - ((ho - 1) * stride + k - 2 * pad);
    let tcfg = ConvTranspose2dConfig {
        padding: pad,
        output_padding: out_pad,
        stride,
        ..Default::default()
    };
    let ours = median_ms(iters, || Ok(conv_transpose2d(&dy, &wt, None, &tcfg)?))?;
    let theirs = median_ms(iters, || {
        Ok(dy.conv_transpose2d(&wt, pad, out_pad, stride, 1)?)
    })?;
    report(&format!("{name} grad_input"), flops, ours, theirs);
    let ours = median_ms(iters, || Ok(conv2d_grad_weight(&x, &dy, (k, k), &cfg)?))?;
    // What candle's backward does for the kernel gradient.
    let theirs = median_ms(iters, || {
        Ok(x.transpose(0, 1)?
            .conv2d(&dy.transpose(0, 1)?, pad, 1, stride, 1)?
            .transpose(0, 1)?
            .contiguous()?)
    })?;
    report(&format!("{name} grad_weight"), flops, ours, theirs);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let iters = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let a = randn(&[1024, 1024])?;
    let b = randn(&[1024, 1024])?;
    let mm = median_ms(iters, || Ok(a.matmul(&b)?))?;
    println!(
        "candle matmul 1024x1024x1024 f32: {mm:.2} ms {:.1} GFLOP/s",
        2.0 * 1024f64.powi(3) / mm / 1e6
    );

    conv_case(
        "conv2d 16x64x64x64 3x3 64->64 p1",
        (16, 64, 64, 64),
        64,
        3,
        1,
        1,
        true,
        iters,
    )?;
    conv_case(
        "conv2d 64x32x28x28 3x3 32->32 p1",
        (64, 32, 28, 28),
        32,
        3,
        1,
        1,
        true,
        iters,
    )?;
    conv_case(
        "conv2d 2x320x64x64 1x1 320->320",
        (2, 320, 64, 64),
        320,
        1,
        0,
        1,
        true,
        iters,
    )?;
    conv_case(
        "conv2d 2x320x64x64 3x3 320->320 p1",
        (2, 320, 64, 64),
        320,
        3,
        1,
        1,
        true,
        iters,
    )?;
    conv_case(
        "conv2d 16x64x64x64 3x3 64->64 p1 s2",
        (16, 64, 64, 64),
        64,
        3,
        1,
        2,
        true,
        iters,
    )?;

    // conv_transpose2d 16x64x32x32 -> 32, k4 s2 p1 (a 2x upsampler).
    let tcfg = ConvTranspose2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let x = randn(&[16, 64, 32, 32])?;
    let wt = randn(&[64, 32, 4, 4])?;
    let flops = 2.0 * (16 * 64 * 32 * 16 * 32 * 32) as f64;
    let ours = median_ms(iters, || Ok(conv_transpose2d(&x, &wt, None, &tcfg)?))?;
    let theirs = median_ms(iters, || Ok(x.conv_transpose2d(&wt, 1, 0, 2, 1)?))?;
    report(
        "conv_transpose2d 16x64x32x32 k4 s2 p1 ->32 fwd",
        flops,
        ours,
        theirs,
    );
    // Backward: input gradient (a strided conv) plus weight gradient.
    let xv = candle_core::Var::from_tensor(&x)?;
    let wv = candle_core::Var::from_tensor(&wt)?;
    let r = randn(&[16, 32, 64, 64])?;
    let ours = median_ms(iters, || {
        let y = conv_transpose2d(xv.as_tensor(), wv.as_tensor(), None, &tcfg)?;
        let g = (y * &r)?.sum_all()?.backward()?;
        Ok(g.get(xv.as_tensor()).unwrap().clone())
    })?;
    let theirs = median_ms(iters, || {
        let y = xv
            .as_tensor()
            .conv_transpose2d(wv.as_tensor(), 1, 0, 2, 1)?;
        let g = (y * &r)?.sum_all()?.backward()?;
        Ok(g.get(xv.as_tensor()).unwrap().clone())
    })?;
    report(
        "conv_transpose2d ... fwd+bwd (3 passes)",
        3.0 * flops,
        ours,
        theirs,
    );
    Ok(())
}

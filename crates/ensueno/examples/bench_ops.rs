//! Micro-benchmark of the fused CPU kernels in `ensueno::ops` against
//! candle's composite ops.
//!
//! `cargo run --release -p ensueno --example bench_ops [-- filter]`
//! prints the median wall time in ms of each case (ours vs candle).

use std::time::Instant;

use candle_core::{Device, Module, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use ensueno::ops::adamw::AdamW;
use ensueno::ops::attention::{
    scaled_dot_product_attention, scaled_dot_product_attention_composite,
};
use ensueno::ops::group_norm::{group_norm, group_norm_composite};

/// Median ms over `iters` runs after one warm-up.
fn median_ms(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn report(name: &str, ours: f64, theirs: f64) {
    println!(
        "{name:<48} ours {ours:>9.2} ms   candle {theirs:>9.2} ms   speed-up {:>6.1}x",
        theirs / ours
    );
}

fn bench_group_norm(shape: &[usize], groups: usize, iters: usize) -> Result<()> {
    let dev = Device::Cpu;
    let c = shape[1];
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, c, &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, c, &dev)?)?;
    let r = Tensor::randn(0f32, 1., shape, &dev)?;
    let (xt, wt, bt) = (
        x.as_tensor().detach(),
        w.as_tensor().detach(),
        b.as_tensor().detach(),
    );
    let ours = median_ms(iters, || {
        group_norm(&xt, groups, &wt, &bt, 1e-5, true).map_err(candle_core::Error::wrap)?;
        Ok(())
    })?;
    let theirs = median_ms(iters, || {
        group_norm_composite(&xt, groups, &wt, &bt, 1e-5, true)?;
        Ok(())
    })?;
    report(
        &format!("group_norm+silu {shape:?} g{groups} fwd"),
        ours,
        theirs,
    );
    // candle_nn's GroupNorm + silu, the way models used it before.
    let cn = candle_nn::GroupNorm::new(wt.clone(), bt.clone(), c, groups, 1e-5)?;
    let theirs_nn = median_ms(iters, || {
        cn.forward(&xt)?.silu()?;
        Ok(())
    })?;
    report("  vs candle_nn::GroupNorm + silu fwd", ours, theirs_nn);
    let ours = median_ms(iters, || {
        let y = group_norm(
            x.as_tensor(),
            groups,
            w.as_tensor(),
            b.as_tensor(),
            1e-5,
            true,
        )
        .map_err(candle_core::Error::wrap)?;
        (y * &r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let theirs = median_ms(iters, || {
        let y = group_norm_composite(
            x.as_tensor(),
            groups,
            w.as_tensor(),
            b.as_tensor(),
            1e-5,
            true,
        )?;
        (y * &r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    report(
        &format!("group_norm+silu {shape:?} g{groups} fwd+bwd"),
        ours,
        theirs,
    );
    Ok(())
}

fn bench_attention_fwd(b: usize, t: usize, d: usize, iters: usize) -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (b, t, d), &dev)?;
    let k = Tensor::randn(0f32, 1., (b, t, d), &dev)?;
    let v = Tensor::randn(0f32, 1., (b, t, d), &dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let ours = median_ms(iters, || {
        scaled_dot_product_attention(&q, &k, &v, scale).map_err(candle_core::Error::wrap)?;
        Ok(())
    })?;
    let theirs = median_ms(iters.min(3), || {
        scaled_dot_product_attention_composite(&q, &k, &v, scale)?;
        Ok(())
    })?;
    report(
        &format!("attention [{b},{t},{d}] fwd (composite softmax)"),
        ours,
        theirs,
    );
    let fused = median_ms(iters.min(3), || {
        let s = (q.matmul(&k.t()?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)?;
        Ok(())
    })?;
    report("  vs matmul + softmax_last_dim fwd", ours, fused);
    Ok(())
}

fn bench_attention_train(b: usize, t: usize, d: usize, iters: usize) -> Result<()> {
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, d), &dev)?)?;
    let r = Tensor::randn(0f32, 1., (b, t, d), &dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let ours_f = median_ms(iters, || {
        scaled_dot_product_attention(&q, &k, &v, scale).map_err(candle_core::Error::wrap)?;
        Ok(())
    })?;
    let theirs_f = median_ms(iters, || {
        scaled_dot_product_attention_composite(&q, &k, &v, scale)?;
        Ok(())
    })?;
    report(&format!("attention [{b},{t},{d}] fwd"), ours_f, theirs_f);
    let ours = median_ms(iters, || {
        let y =
            scaled_dot_product_attention(&q, &k, &v, scale).map_err(candle_core::Error::wrap)?;
        (y * &r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let theirs = median_ms(iters, || {
        let y = scaled_dot_product_attention_composite(&q, &k, &v, scale)?;
        (y * &r)?.sum_all()?.backward()?;
        Ok(())
    })?;
    report(&format!("attention [{b},{t},{d}] fwd+bwd"), ours, theirs);
    Ok(())
}

fn bench_adamw(n: usize, iters: usize) -> Result<()> {
    let dev = Device::Cpu;
    let make = || -> Result<(Var, candle_core::backprop::GradStore)> {
        let p = Var::from_tensor(&Tensor::randn(0f32, 1., n, &dev)?)?;
        let grads = (p.as_tensor() * p.as_tensor())?.sum_all()?.backward()?;
        Ok((p, grads))
    };
    let (p1, g1) = make()?;
    let (p2, g2) = make()?;
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 1e-2,
        ..Default::default()
    };
    let mut ours = AdamW::new(vec![p1], params.clone())?;
    let mut theirs = candle_nn::AdamW::new(vec![p2], params)?;
    let t_ours = median_ms(iters, || ours.step(&g1))?;
    let t_theirs = median_ms(iters, || theirs.step(&g2))?;
    report(&format!("AdamW step, {n} params"), t_ours, t_theirs);
    Ok(())
}

fn main() -> Result<()> {
    let filter = std::env::args().nth(1).unwrap_or_default();
    let run = |name: &str| filter.is_empty() || name.contains(&filter);
    println!("threads: {}", candle_core::utils::get_num_threads());
    if run("group_norm") {
        bench_group_norm(&[64, 32, 28, 28], 32, 10)?;
        bench_group_norm(&[2, 320, 64, 64], 32, 10)?;
    }
    if run("attention") {
        bench_attention_fwd(16, 4096, 40, 3)?;
        bench_attention_train(64, 196, 64, 10)?;
    }
    if run("adamw") {
        bench_adamw(1 << 20, 20)?;
    }
    Ok(())
}

//! Winograd F(2x2, 3x3) against the im2col path on the 3x3 stride-1
//! convolutions of the project's UNets: forward and weight-gradient time,
//! best of interleaved runs, and the effective GFLOP/s (direct-convolution
//! flop count).
//! Run: `RAYON_NUM_THREADS=2 cargo run --release -p ensueno --example bench_winograd [N,C,HW,O ...]`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use ensueno::ops::conv::{conv2d, conv2d_grad_weight, set_winograd, Conv2dConfig};

fn main() -> anyhow::Result<()> {
    ensueno::utils::tune_allocator();
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let cases = [
        (64, 32, 28, 32),
        (64, 32, 28, 64),
        (64, 64, 28, 32),
        (64, 96, 28, 32),
        (64, 64, 14, 64),
        (64, 64, 7, 64),
        (16, 64, 64, 64),
        (8, 128, 32, 128),
        (2, 320, 64, 320),
        (2, 640, 32, 640),
        (2, 1280, 16, 1280),
        (2, 1280, 8, 1280),
    ];
    // Arguments `N,C,HW,O` pick cases; none runs them all.
    let picked: Vec<String> = std::env::args().skip(1).collect();
    for (n, c, hw, o) in cases {
        if !picked.is_empty() && !picked.contains(&format!("{n},{c},{hw},{o}")) {
            continue;
        }
        let x = Tensor::randn(0f32, 1., (n, c, hw, hw), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 0.1, (o, c, 3, 3), &Device::Cpu)?;
        let dy = Tensor::randn(0f32, 1., (n, o, hw, hw), &Device::Cpu)?;
        let flops = 2.0 * (n * o * c * 9 * hw * hw) as f64;
        for (what, run) in [
            (
                "forward",
                &(|| conv2d(&x, &w, None, &cfg)) as &dyn Fn() -> _,
            ),
            ("weight gradient", &|| {
                conv2d_grad_weight(&x, &dy, (3, 3), &cfg)
            }),
        ] {
            let mut best = [f64::MAX; 2];
            let mut outs = Vec::new();
            for round in 0..6 {
                for (i, on) in [true, false].into_iter().enumerate() {
                    set_winograd(on);
                    let t0 = Instant::now();
                    let y = run()?;
                    best[i] = best[i].min(t0.elapsed().as_secs_f64());
                    if round == 0 {
                        outs.push(y);
                    }
                }
            }
            let diff = (&outs[0] - &outs[1])?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let scale = outs[1].abs()?.max_all()?.to_scalar::<f32>()?;
            println!(
                "[{n},{c},{hw},{hw}] -> {o} {what}: winograd {:.2} ms ({:.0} GFLOP/s), im2col {:.2} ms ({:.0} GFLOP/s), speed-up {:.2}, max rel diff {:.1e}",
                best[0] * 1e3,
                flops / best[0] / 1e9,
                best[1] * 1e3,
                flops / best[1] / 1e9,
                best[1] / best[0],
                diff / scale
            );
        }
    }
    Ok(())
}

//! Times the 3x3 convolutions of the DDPM train step (28x28, 14x14, 7x7 at
//! batch 64), forward and backward, to tune the conv kernels at small sizes.
//! Run: `cargo run --release -p ensueno --example profile_conv_small`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use ensueno::ops::conv::{conv2d, Conv2dConfig};

fn main() -> anyhow::Result<()> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    for (c, hw) in [(32usize, 28usize), (64, 14), (64, 7)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, c, hw, hw), &Device::Cpu)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c, c, 3, 3), &Device::Cpu)?)?;
        let mut best_f = f64::MAX;
        let mut best_b = f64::MAX;
        for _ in 0..7 {
            let t = Instant::now();
            let y = conv2d(x.as_tensor(), w.as_tensor(), None, &cfg)?;
            best_f = best_f.min(t.elapsed().as_secs_f64());
            let loss = y.sum_all()?;
            let t = Instant::now();
            let _g = loss.backward()?;
            best_b = best_b.min(t.elapsed().as_secs_f64());
        }
        println!(
            "conv3x3 [64,{c},{hw},{hw}]: fwd {:.2} ms, bwd {:.2} ms",
            best_f * 1e3,
            best_b * 1e3
        );
    }
    Ok(())
}

//! Splits one DDPM train step (the `train_step` figure of `benches/cpu.rs`:
//! `UNet2DModel` 28x28x1, batch 64) into forward + loss, backward and the
//! AdamW update; prints each step's wall time (stderr) and the best of the
//! eight runs of each phase.
//! Run: `RAYON_NUM_THREADS=2 cargo run --release -p ensueno --example profile_train_step`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use ensueno::models::unet_2d::{UNet2DConfig, UNet2DModel};

fn main() -> anyhow::Result<()> {
    ensueno::utils::tune_allocator();
    let dev = Device::Cpu;
    let config = UNet2DConfig::ddpm_mnist_class_conditional();
    let b = 64;
    let x = Tensor::randn(0f32, 1., (b, 1, 28, 28), &dev)?;
    let noise = Tensor::randn(0f32, 1., (b, 1, 28, 28), &dev)?;
    let t = Tensor::rand(0f32, 1000., b, &dev)?.floor()?;
    let labels = (Tensor::rand(0f32, 10., b, &dev)?.floor()?).to_dtype(DType::U32)?;
    let varmap = VarMap::new();
    let model = UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &config)?;
    let mut opt =
        ensueno::ops::adamw::AdamW::new(varmap.all_vars(), candle_nn::ParamsAdamW::default())?;
    let (mut fwd, mut bwd, mut step) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..8 {
        let t0 = Instant::now();
        let pred = model.forward(&x, &t, Some(&labels))?;
        let loss = candle_nn::loss::mse(&pred, &noise)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        eprintln!("step {:.3} s", (t3 - t0).as_secs_f64());
        fwd = fwd.min((t1 - t0).as_secs_f64());
        bwd = bwd.min((t2 - t1).as_secs_f64());
        step = step.min((t3 - t2).as_secs_f64());
    }
    println!(
        "forward+loss {:.1} ms, backward {:.1} ms, adamw {:.1} ms",
        fwd * 1e3,
        bwd * 1e3,
        step * 1e3
    );
    Ok(())
}

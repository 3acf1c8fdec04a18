//! Times one training step of the text-to-image UNet (forward, backward,
//! optimiser) on random data: `cargo run --release -p ensueno --example t2i_step -- CONFIG [BATCH]`.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use ensueno::models::unet_2d_condition::UNet2DConditionModel;
use ensueno::train::text2image::Text2ImageConfig;
use ensueno::train::ParamStore;

fn main() -> ensueno::Result<()> {
    ensueno::utils::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let config = Text2ImageConfig::from_file(std::path::Path::new(&args[1]))?;
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let dev = Device::Cpu;
    let params = ParamStore::new(0);
    let unet = UNet2DConditionModel::new(params.var_builder(DType::F32, &dev), &config.unet)?;
    let vars = params.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = ensueno::ops::adamw::AdamW::new(vars, Default::default())?;
    let x = Tensor::randn(0f32, 1., (batch, 4, 8, 8), &dev)?;
    let ctx = Tensor::randn(0f32, 1., (batch, config.recipe.max_text_tokens, 384), &dev)?;
    let t = Tensor::full(500f32, batch, &dev)?;
    for i in 0..4 {
        let t0 = Instant::now();
        let y = unet.forward(&x, &t, &ctx)?;
        let loss = y.sqr()?.mean_all()?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        println!(
            "step {i}: forward {:.3} s, backward {:.3} s, optimiser {:.3} s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
    }
    let t0 = Instant::now();
    let y = unet.forward(
        &x.narrow(0, 0, 2)?,
        &t.narrow(0, 0, 2)?,
        &ctx.narrow(0, 0, 2)?,
    )?;
    let _ = y.sum_all()?.to_scalar::<f32>()?;
    println!(
        "inference forward (batch 2): {:.4} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

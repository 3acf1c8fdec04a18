//! ensueno's side of the SD 1.5 one-step benchmark (see scripts/bench_sd15.sh):
//! load a diffusers folder, time one UNet step with classifier-free guidance
//! (batch 2, 64x64x4 latents, 77 tokens) and a whole 1-step 512x512
//! generation, print `TIME name seconds` and the peak RSS.
//!
//!     cargo run --release --example sd15_step -- MODEL_DIR

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ensueno::io::model_folder::ModelFolder;
use ensueno::pipelines::{GenerationInputs, GenerationRequest, Limits, StableDiffusionPipeline};
use ensueno::schedulers::SchedulerKind;
use ensueno::utils::NoiseGenerator;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: sd15_step MODEL_DIR"))?;
    let device = Device::Cpu;
    let t0 = Instant::now();
    let folder = ModelFolder::open(
        std::path::Path::new(&dir),
        &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    )?;
    let mut pipe = StableDiffusionPipeline::load(&folder, &device, DType::F32)?;
    println!("TIME load {:.3}", t0.elapsed().as_secs_f64());

    let latents = NoiseGenerator::new(0).randn((1, 4, 64, 64), DType::F32, &device)?;
    let (pos, _) = pipe.encode_prompt("a red apple on a tree", 0)?;
    let (neg, _) = pipe.encode_prompt("", 0)?;
    let ctx = Tensor::cat(&[neg, pos], 0)?;
    let x = Tensor::cat(&[&latents, &latents], 0)?;
    let t = Tensor::new(&[981f32, 981.0], &device)?;
    pipe.unet.forward(&x, &t, &ctx)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t0 = Instant::now();
        pipe.unet.forward(&x, &t, &ctx)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!("TIME unet_step_cfg {best:.3}");

    // As the CLI does: one generation, so the text encoder can go once used.
    pipe.release_text_encoder_after_use(true);
    let mut request = GenerationRequest::new("a red apple on a tree");
    request.steps = 1;
    request.scheduler = SchedulerKind::Ddim;
    request.width = Some(512);
    request.height = Some(512);
    let t0 = Instant::now();
    pipe.generate(
        &request,
        GenerationInputs {
            latents: Some(latents),
            ..Default::default()
        },
        &Limits::default(),
        &mut |_| true,
    )?;
    println!("TIME generate_1_step {:.3}", t0.elapsed().as_secs_f64());
    println!("PEAK_RSS_MB {:.0}", peak_rss_mb());
    Ok(())
}

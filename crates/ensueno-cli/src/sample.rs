//! `ensueno sample`: images from a model trained by `ensueno train`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ensueno::pipelines::trained_model::{class_for_prompt, SampleSettings, TrainedModel};
use ensueno::schedulers::SchedulerKind;

use crate::generate::{parse_scheduler, pick_device, DeviceArg};

#[derive(Args)]
pub struct SampleArgs {
    /// A model folder written by `ensueno train` (or its --output folder).
    #[arg(long)]
    model: PathBuf,
    /// The class to draw (0-based; a digit for MNIST models).
    #[arg(long, conflicts_with = "prompt")]
    class: Option<u32>,
    /// Name the class in words instead: "a handwritten seven", "a sneaker".
    #[arg(long)]
    prompt: Option<String>,
    /// Number of samples.
    #[arg(long, default_value_t = 16)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A folder (one PNG per sample) or a .png file (a grid of all samples).
    #[arg(long, short)]
    output: PathBuf,
    /// Denoising steps (diffusion models; default: the model's sampling.json).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (diffusion models).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// Sampler (diffusion models): ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras.
    #[arg(long, value_parser = parse_scheduler)]
    scheduler: Option<SchedulerKind>,
    /// cpu or cuda.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

fn is_png(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

pub fn run(args: SampleArgs) -> Result<()> {
    if args.n == 0 || args.n > 4096 {
        bail!("--n must be in 1..=4096, got {}", args.n);
    }
    let device = pick_device(args.device)?;
    let (model, dir) = TrainedModel::load(&args.model, &device)
        .with_context(|| format!("cannot load --model {}", args.model.display()))?;
    let names = model.class_names();
    let class = match (&args.class, &args.prompt) {
        (Some(c), _) => {
            if names.is_empty() {
                bail!("{} is unconditional: it takes no --class", dir.display());
            }
            if *c as usize >= names.len() {
                bail!(
                    "--class {c} is out of range: this model knows {} classes (0..={})",
                    names.len(),
                    names.len() - 1
                );
            }
            Some(*c)
        }
        (None, Some(p)) => Some(class_for_prompt(p, names)?),
        (None, None) => None,
    };
    let classes = class.map(|c| vec![c; args.n]);
    let settings = SampleSettings {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler: args.scheduler,
    };
    let t0 = std::time::Instant::now();
    let images = model.sample(
        classes.as_deref(),
        args.n,
        args.seed,
        &settings,
        &mut |_, _| Ok(()),
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    if is_png(&args.output) {
        let columns = (args.n as f64).sqrt().ceil() as usize;
        ensueno::io::plot::image_grid(&args.output, &images, columns, 2, 1)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        eprintln!(
            "wrote a grid of {} samples to {} ({seconds:.2} s)",
            args.n,
            args.output.display()
        );
    } else {
        std::fs::create_dir_all(&args.output)
            .with_context(|| format!("cannot create {}", args.output.display()))?;
        for i in 0..args.n {
            let path = args.output.join(format!("sample-{i:04}.png"));
            let one = images.narrow(0, i, 1)?;
            ensueno::io::plot::image_grid(&path, &one, 1, 0, 1)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        eprintln!(
            "wrote {} samples to {} ({seconds:.2} s)",
            args.n,
            args.output.display()
        );
    }
    Ok(())
}

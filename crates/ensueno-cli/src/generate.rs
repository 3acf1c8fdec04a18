//! `ensueno generate`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use ensueno::io::animation::save_gif;
use ensueno::io::hub::resolve_model;
use ensueno::io::images::load_image;
use ensueno::io::model_folder::ModelFolder;
use ensueno::io::npy::read_npy;
use ensueno::io::png_info::{save_png_with_parameters, PngParameters};
use ensueno::models::autoencoder_tiny::AutoencoderTiny;
use ensueno::pipelines::prompting::{no_styles_error, PromptingConfig};
use ensueno::pipelines::stable_diffusion::Vae;
use ensueno::pipelines::{
    default_model_dir, GenerationInputs, GenerationRequest, Limits, StableDiffusionPipeline,
};
use ensueno::schedulers::SchedulerKind;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct GenerateArgs {
    /// What to draw.
    prompt: String,
    /// A diffusers model folder or a Hugging Face repo id (e.g. runwayml/stable-diffusion-v1-5).
    /// Default: $ENSUENO_MODEL, else ensueno's own model (models/emoji-text2image).
    #[arg(long, env = "ENSUENO_MODEL")]
    model: Option<String>,
    /// An art style the model knows (ensueno's own model: noto or twemoji); added to the prompt
    /// as the model was trained ("PROMPT, noto style").
    #[arg(long)]
    style: Option<String>,
    /// What the image should not show.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps (default: the model's, else 25).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale, 1 turns guidance off (default: the model's, else 7.5).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// Sampler: ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras.
    #[arg(long, default_value = "dpm++2m", value_parser = parse_scheduler)]
    scheduler: SchedulerKind,
    /// Width in pixels (a multiple of 8); default: the model's size, or the init image's.
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (a multiple of 8).
    #[arg(long)]
    height: Option<usize>,
    /// Random seed; image i of a batch uses seed + i. Default: random.
    #[arg(long)]
    seed: Option<u64>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// img2img: start from this image.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much to repaint, 0 (nothing) to 1 (everything).
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
    /// Initial latents (.npy, f32, [batch, channels, H/8, W/8]) instead of seeded noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Skip the last N layers of the text encoder.
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Where to write the image; numbered (name-1.png, name-2.png...) when --batch > 1.
    /// Default: ensueno-SEED.png.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Write a preview of the image forming to this PNG after every step.
    #[arg(long)]
    preview: Option<PathBuf>,
    /// Write the denoising steps as an animated GIF (the first image of a batch).
    #[arg(long)]
    save_progress: Option<PathBuf>,
    /// TAESD decoder for previews: a taesd_decoder.safetensors file (default: a fast colour approximation).
    #[arg(long)]
    taesd: Option<PathBuf>,
    /// cpu or cuda (default: cuda when built with it and a GPU is present).
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Compute precision (default: f32 on CPU, f16 on CUDA).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// The device a `--device` flag asks for (default: CUDA when built with it
/// and present).
pub fn pick_device(arg: Option<DeviceArg>) -> Result<Device> {
    Ok(match arg {
        Some(DeviceArg::Cpu) => Device::Cpu,
        Some(DeviceArg::Cuda) => Device::new_cuda(0).context("--device cuda")?,
        None => ensueno::utils::default_device(),
    })
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

pub fn parse_scheduler(s: &str) -> std::result::Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|e| e.to_string())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Where the model is and its prompt conventions: cheap, before any weights.
    let root = match args.model.as_deref() {
        Some(model) => resolve_model(model)?,
        None => default_model_dir().context(
            "no --model given and ensueno's own model is missing (it ships in the repository's models/)",
        )?,
    };
    let prompting = PromptingConfig::load(&root)?;
    let prompt = match (&args.style, &prompting) {
        (None, _) => args.prompt.clone(),
        (Some(style), Some(p)) => p.apply_style(&args.prompt, style)?,
        (Some(_), None) => return Err(no_styles_error(&root.display().to_string()).into()),
    };
    if prompt.trim().is_empty() {
        eprintln!("note: the prompt is empty: this draws an unconditional sample");
    }
    if let Some(path) = &args.save_progress {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("gif") => {}
            _ => bail!(
                "--save-progress must be a .gif file, got {}",
                path.display()
            ),
        }
    }
    let defaults = GenerationRequest::new("");
    let request = GenerationRequest {
        prompt,
        negative_prompt: args.negative_prompt.clone(),
        steps: args
            .steps
            .or(prompting.as_ref().map(|p| p.num_inference_steps))
            .unwrap_or(defaults.steps),
        guidance_scale: args
            .guidance_scale
            .or(prompting.as_ref().map(|p| p.guidance_scale))
            .unwrap_or(defaults.guidance_scale),
        scheduler: args.scheduler,
        width: args.width,
        height: args.height,
        seed: Some(args.seed.unwrap_or_else(rand_seed)),
        batch: args.batch,
        strength: args.strength,
        clip_skip: args.clip_skip,
    };
    let limits = Limits::default();
    // Check what can be checked before loading gigabytes of weights.
    request.validate(&limits, 8)?;
    if args.latents.is_some() && args.seed.is_some() {
        tracing::warn!("--latents given: --seed only affects stochastic samplers");
    }
    let outputs = output_paths(
        args.output.as_deref(),
        request.seed.unwrap_or(0),
        request.batch,
    )?;
    let init_image = args
        .init_image
        .as_deref()
        .map(load_image)
        .transpose()
        .context("cannot read --init-image")?;
    if init_image.is_none() && args.strength != 0.75 {
        tracing::warn!("--strength only applies with --init-image");
    }

    let device = pick_device(args.device)?;
    let dtype = match (args.dtype, &device) {
        (Some(DTypeArg::F32), _) => DType::F32,
        (Some(DTypeArg::F16), _) => DType::F16,
        (Some(DTypeArg::Bf16), _) => DType::BF16,
        (None, Device::Cpu) => DType::F32,
        (None, _) => DType::F16,
    };
    if device.is_cpu() && dtype != DType::F32 {
        bail!("--dtype f16/bf16 is not supported on the CPU yet (candle's CPU convolutions need f32); use --dtype f32");
    }
    let latents = args
        .latents
        .as_deref()
        .map(|p| read_npy(p, &device))
        .transpose()
        .context("cannot read --latents")?;

    let folder = ModelFolder::open(
        &root,
        &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    )?;
    let mut pipeline =
        StableDiffusionPipeline::load(&folder, &device, dtype).context("cannot load the model")?;
    pipeline.release_text_encoder_after_use(true);

    let previewer = match (&args.preview, &args.taesd) {
        (Some(_), Some(taesd)) => Some(StableDiffusionPipeline::previewer(Some(
            AutoencoderTiny::from_taesd_files(None, taesd, dtype, &device)
                .context("cannot load --taesd")?,
        ))),
        (Some(_), None) => Some(StableDiffusionPipeline::previewer(None)),
        (None, Some(_)) => bail!("--taesd is only used with --preview FILE.png"),
        (None, None) => None,
    };

    let bar = ProgressBar::new(request.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut preview_error = None;
    let mut frames = Vec::new();
    let mut on_step = |p: &ensueno::pipelines::StepProgress| {
        if args.save_progress.is_some() {
            let latents = p.pred_original.unwrap_or(p.latents);
            match progress_frame(&pipeline, previewer.as_ref(), latents) {
                Ok(frame) => frames.push(frame),
                Err(e) => {
                    preview_error.get_or_insert(e);
                }
            }
        }
        bar.set_length(p.total_steps as u64);
        bar.set_position(p.step as u64);
        if let (Some(path), Some(previewer)) = (&args.preview, &previewer) {
            let latents = p.pred_original.unwrap_or(p.latents);
            let written = previewer
                .preview(&latents.narrow(0, 0, 1).unwrap_or_else(|_| latents.clone()))
                .map_err(anyhow::Error::from)
                .and_then(|imgs| {
                    let img = imgs.into_iter().next().context("empty preview")?;
                    save_png_with_parameters(path, &img, None)?;
                    Ok(())
                });
            if let Err(e) = written {
                preview_error.get_or_insert(e);
            }
        }
        true
    };
    let output = pipeline.generate(
        &request,
        GenerationInputs {
            init_image,
            latents,
            posterior_noise: None,
        },
        &limits,
        &mut on_step,
    )?;
    bar.finish_and_clear();
    if let Some(e) = preview_error {
        tracing::warn!("could not write the preview: {e:#}");
    }
    for w in &output.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(path) = &args.save_progress {
        if let Some(last) = output.images.first() {
            frames.push(last.clone());
        }
        save_gif(path, &frames, 120, 1500, 4)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {} ({} frames)", path.display(), frames.len());
    }
    for ((img, seed), path) in output.images.iter().zip(&output.seeds).zip(&outputs) {
        let params = PngParameters::for_image(
            &request,
            *seed,
            (output.width, output.height),
            &pipeline.name,
            args.init_image.is_some(),
        );
        save_png_with_parameters(path, img, Some(&params.to_text()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {} (seed {seed})", path.display());
    }
    Ok(())
}

/// One frame of the denoising animation: the model's own VAE when it is the
/// cheap TAESD, else the preview decoder (colour approximation or --taesd).
fn progress_frame(
    pipeline: &StableDiffusionPipeline,
    previewer: Option<&ensueno::pipelines::latent_preview::LatentPreviewer>,
    latents: &candle_core::Tensor,
) -> Result<image::RgbImage> {
    let first = latents.narrow(0, 0, 1)?;
    let images = match (&pipeline.vae, previewer) {
        (Vae::Tiny(_), _) => pipeline.decode_latents(&first)?,
        (_, Some(p)) => p.preview(&first)?,
        (_, None) => StableDiffusionPipeline::previewer(None).preview(&first)?,
    };
    images.into_iter().next().context("empty preview")
}

fn rand_seed() -> u64 {
    // Seeds shown to people stay short enough to type.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_nanos() % 4_294_967_296) as u64)
        .unwrap_or(0)
}

/// The file of each image: `--output` as given for one image, numbered
/// `stem-1.ext`, `stem-2.ext`... for a batch.
fn output_paths(output: Option<&Path>, seed: u64, batch: usize) -> Result<Vec<PathBuf>> {
    let base = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("ensueno-{seed}.png")));
    match base.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => {}
        _ => bail!("--output must be a .png file, got {}", base.display()),
    }
    if let Some(dir) = base.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("--output: the folder {} does not exist", dir.display());
        }
    }
    if batch == 1 {
        return Ok(vec![base]);
    }
    let stem = base
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("ensueno");
    Ok((1..=batch)
        .map(|i| base.with_file_name(format!("{stem}-{i}.png")))
        .collect())
}

//! `ensueno train`: train models from scratch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand};
use ensueno::data::{self, ImageDataset, LoadOptions, Split};
use ensueno::eval::ClassifierConfig;
use ensueno::models::conv_vae::ConvVAEConfig;
use ensueno::models::dcgan::DCGANConfig;
use ensueno::train::classifier::ClassifierTask;
use ensueno::train::diffusion::{mnist_unet_config, DiffusionRecipe, DiffusionTask};
use ensueno::train::gan::GanTask;
use ensueno::train::vae::VaeTask;
use ensueno::train::{TrainEvent, TrainOptions, TrainSummary, TrainTask};
use indicatif::{ProgressBar, ProgressStyle};

use crate::generate::{pick_device, DeviceArg};

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Pixel-space DDPM with a UNet2DModel, class-conditional with classifier-free guidance.
    Diffusion(DiffusionArgs),
    /// The Keras example's variational autoencoder (2-D latent) on MNIST-like images.
    Vae(VaeArgs),
    /// DCGAN, class-conditional unless --unconditional (non-saturating loss, Adam 2e-4, beta1 0.5).
    Gan(GanArgs),
    /// Latent text-to-image diffusion (frozen text encoder, MiniLM or CLIP, + TAESD, cross-attention UNet), from a config file.
    Text2image(Text2ImageArgs),
    /// CLIP from scratch on captioned images (text transformer + ViT, symmetric InfoNCE), from a
    /// config file; saved as a transformers CLIPModel folder.
    Clip(ClipArgs),
    /// The scoring classifier for `ensueno eval` (the shared MNIST classifier's architecture), e.g. for Fashion-MNIST.
    Classifier(ClassifierArgs),
}

/// Flags every trainer takes.
#[derive(Args, Clone)]
pub struct CommonArgs {
    /// Training data: a folder of idx files, a WebDataset .tar, or a folder of images with .txt captions.
    /// Default: $ENSUENO_DATA/<dataset>, then the `ensueno data fetch` cache.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Which known dataset --data (or ENSUENO_DATA) holds: mnist or fashion-mnist.
    #[arg(long, default_value = "mnist")]
    pub dataset: String,
    /// Checkpoints, loss curves and sample grids go here.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Epochs (default: the recipe's).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size (default: the recipe's).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate (default: the recipe's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the weights' initialisation, the data order and every random draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue the run in --output from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop each epoch after this many batches (quick trials).
    #[arg(long)]
    pub max_steps_per_epoch: Option<usize>,
    /// cpu or cuda.
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
}

impl CommonArgs {
    fn options(&self, epochs: usize, batch_size: usize, lr: f64) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs.unwrap_or(epochs),
            batch_size: self.batch_size.unwrap_or(batch_size),
            lr: self.lr.unwrap_or(lr),
            seed: self.seed,
            resume: self.resume,
            max_steps_per_epoch: self.max_steps_per_epoch,
            ..TrainOptions::new(&self.output)
        }
    }

    fn load(&self, split: Split) -> Result<ImageDataset> {
        let path = data::resolve_data_path(self.data.as_deref(), &self.dataset)?;
        let options = LoadOptions {
            split,
            ..LoadOptions::default()
        };
        data::open(&path, &options)
            .with_context(|| format!("cannot load the data in {}", path.display()))
    }
}

#[derive(Args)]
pub struct DiffusionArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A UNet2DModel config.json to train instead of the default MNIST model.
    #[arg(long)]
    unet_config: Option<PathBuf>,
    /// Ignore the labels: an unconditional model.
    #[arg(long)]
    unconditional: bool,
    /// Probability of dropping a label during training (for classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    cond_dropout: f64,
    /// Decay of the EMA weights that are saved and sampled.
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    /// Default guidance scale written into the model's sampling.json.
    #[arg(long, default_value_t = 2.0)]
    guidance_scale: f64,
}

pub fn run(command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Diffusion(args) => train_diffusion(args),
        TrainCommand::Classifier(args) => train_classifier(args),
        TrainCommand::Clip(args) => train_clip(args),
        TrainCommand::Vae(args) => train_vae(args),
        TrainCommand::Gan(args) => train_gan(args),
        TrainCommand::Text2image(args) => train_text2image(args),
    }
}

#[derive(Args)]
pub struct VaeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A ConvVAE config.json instead of the Keras example's model.
    #[arg(long)]
    vae_config: Option<PathBuf>,
    /// Train on the training split only (the Keras example trains on train + test).
    #[arg(long)]
    train_split_only: bool,
}

fn train_vae(args: VaeArgs) -> Result<()> {
    let device = pick_device(args.common.device)?;
    let train = args.common.load(Split::Train)?;
    let test = args.common.load(Split::Test).ok();
    let data = match (&test, args.train_split_only) {
        (Some(t), false) => {
            ImageDataset::concat(vec![train, t.subset(&(0..t.len()).collect::<Vec<_>>())])?
        }
        _ => train,
    };
    let config = match &args.vae_config {
        Some(p) => ConvVAEConfig::from_file(p)?,
        None => ConvVAEConfig::default(),
    };
    let options = args.common.options(30, 128, 1e-3);
    let mut task = VaeTask::new(config, &options, test, &device)?;
    let what = format!(
        "training a {}-parameter ConvVAE on {} ({} images)",
        task.num_parameters(),
        data.name,
        data.len()
    );
    train_and_report(&mut task, &what, &data, &options, &device)
}

#[derive(Args)]
pub struct GanArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Ignore the labels.
    #[arg(long)]
    unconditional: bool,
}

fn train_gan(args: GanArgs) -> Result<()> {
    let device = pick_device(args.common.device)?;
    let data = args.common.load(Split::Train)?;
    let config = DCGANConfig {
        num_classes: if args.unconditional {
            None
        } else {
            Some(
                data.num_classes()
                    .context("the data has no labels: pass --unconditional")?,
            )
        },
        sample_size: data.height,
        channels: data.channels,
        ..DCGANConfig::default()
    };
    let options = args.common.options(10, 64, 2e-4);
    let mut task = GanTask::new(config, &options, &device)?;
    let (g, d) = task.num_parameters();
    let what = format!(
        "training a DCGAN ({g} + {d} parameters) on {} ({} images)",
        data.name,
        data.len()
    );
    train_and_report(&mut task, &what, &data, &options, &device)
}

#[derive(Args)]
pub struct ClassifierArgs {
    #[command(flatten)]
    common: CommonArgs,
}

fn train_classifier(args: ClassifierArgs) -> Result<()> {
    let device = pick_device(args.common.device)?;
    let data = args.common.load(Split::Train)?;
    let class_names = data
        .class_names
        .clone()
        .context("the data has no class labels")?;
    // Inputs are standardised with the training set's own pixel statistics.
    let n = data.images.len() as f64;
    let mean = data.images.iter().map(|&p| p as f64 / 255.).sum::<f64>() / n;
    let var = data
        .images
        .iter()
        .map(|&p| (p as f64 / 255. - mean).powi(2))
        .sum::<f64>()
        / n;
    let config = ClassifierConfig::new(class_names, mean, var.sqrt());
    let options = args.common.options(3, 64, 1e-3);
    let mut task = ClassifierTask::new(config, options.lr, options.seed, &device)?;
    let summary = run_task(&mut task, &data, &options, &device)?;
    let test = args.common.load(Split::Test)?;
    let labels = test.labels.clone().context("the test set has no labels")?;
    let all: Vec<usize> = (0..test.len()).collect();
    let mut predicted = Vec::with_capacity(test.len());
    for chunk in all.chunks(500) {
        predicted.extend(task.model().predict(&test.batch_images(chunk, &device)?)?);
    }
    // The exported model has the final weights: score that one.
    let accuracy = ensueno::eval::accuracy(&predicted, &labels);
    report(&summary, &options.output);
    println!(
        "test accuracy: {:.2}% ({} images of {})",
        100. * accuracy,
        test.len(),
        test.name
    );
    Ok(())
}

fn train_diffusion(args: DiffusionArgs) -> Result<()> {
    let device = pick_device(args.common.device)?;
    let data = args.common.load(Split::Train)?;
    let class_names = if args.unconditional {
        Vec::new()
    } else {
        data.class_names.clone().unwrap_or_default()
    };
    let config = match &args.unet_config {
        Some(path) => ensueno::io::model_folder::read_json(path)?,
        None => mnist_unet_config((!class_names.is_empty()).then_some(class_names.len())),
    };
    let recipe = DiffusionRecipe {
        cond_dropout: args.cond_dropout,
        ema_decay: args.ema_decay,
        guidance_scale: args.guidance_scale,
        class_names,
        ..DiffusionRecipe::default()
    };
    let options = args.common.options(10, 128, 1e-3);
    let mut task = DiffusionTask::new(config, recipe, options.lr, options.seed, &device)?;
    let what = format!(
        "training a {}-parameter UNet2DModel on {} ({} images)",
        task.num_parameters(),
        data.name,
        data.len()
    );
    train_and_report(&mut task, &what, &data, &options, &device)
}

/// The run flags of the trainers driven by a config file (`train text2image`,
/// `train clip`): each overrides the config's `training` value.
#[derive(Args)]
pub struct ConfigRunArgs {
    /// Checkpoints, loss curves, samples or scores, and model/ go here.
    #[arg(long, short)]
    output: PathBuf,
    /// Epochs (default: the config's).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size (default: the config's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate (default: the config's).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed (default: the config's).
    #[arg(long)]
    seed: Option<u64>,
    /// Continue the run in --output from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop each epoch after this many batches (quick trials).
    #[arg(long)]
    max_steps_per_epoch: Option<usize>,
    /// cpu or cuda.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

impl ConfigRunArgs {
    fn options(&self, run: &ensueno::train::text2image::RunDefaults) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs.unwrap_or(run.epochs),
            batch_size: self.batch_size.unwrap_or(run.batch_size),
            lr: self.lr.unwrap_or(run.lr),
            seed: self.seed.unwrap_or(run.seed),
            resume: self.resume,
            max_steps_per_epoch: self.max_steps_per_epoch,
            ..TrainOptions::new(&self.output)
        }
    }
}

#[derive(Args)]
pub struct Text2ImageArgs {
    /// The training config (UNet, recipe, run defaults), e.g. configs/text2image-emoji.json.
    #[arg(long)]
    config: PathBuf,
    /// Captioned images: a WebDataset .tar, a folder of tars (each tar's name is a style), or a
    /// folder of images with .txt captions. Default: $ENSUENO_DATA/emoji.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The frozen text encoder: a sentence-transformers BERT folder (all-MiniLM-L6-v2), a CLIP
    /// folder written by `ensueno train clip` (or a CLIPTextModel folder with its CLIP tokenizer),
    /// or a diffusers pipeline folder whose text_encoder/, tokenizer/ and vae/ are used.
    /// Default: ensueno's shipped model (models/emoji-text2image), which holds all three.
    #[arg(long, env = "ENSUENO_TEXT_ENCODER")]
    text_encoder: Option<PathBuf>,
    /// The frozen autoencoder: a folder with taesd_encoder.safetensors and
    /// taesd_decoder.safetensors, or a diffusers AutoencoderTiny folder.
    /// Default: the vae/ of the --text-encoder pipeline folder.
    #[arg(long, env = "ENSUENO_TAESD")]
    taesd: Option<PathBuf>,
    #[command(flatten)]
    run: ConfigRunArgs,
    /// Start from these UNet weights instead of random ones: a diffusers
    /// unet/ folder or a pipeline folder (e.g. models/emoji-text2image).
    /// Optimizer state and EMA start fresh.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    init_unet: Option<PathBuf>,
}

fn train_text2image(args: Text2ImageArgs) -> Result<()> {
    use ensueno::train::text2image::{FrozenParts, Text2ImageConfig, Text2ImageTask};
    let config = Text2ImageConfig::from_file(&args.config)?;
    let device = pick_device(args.run.device)?;
    let path = data::resolve_data_path(args.data.as_deref(), "emoji")?;
    let data = data::open(&path, &config.recipe.load_options())
        .with_context(|| format!("cannot load the data in {}", path.display()))?;
    let run = &config.training;
    let options = args.run.options(run);
    let source = match &args.text_encoder {
        Some(p) => p.clone(),
        None => ensueno::pipelines::default_model_dir().context(
            "no --text-encoder given, and the shipped model that holds the default one is missing",
        )?,
    };
    let frozen = FrozenParts::from_paths(&source, args.taesd.as_deref())?;
    eprintln!(
        "encoding {} images and their captions with the frozen text encoder and TAESD",
        data.len()
    );
    let started = Instant::now();
    let mut task = Text2ImageTask::new(
        config,
        frozen,
        &data,
        options.lr,
        options.seed,
        &device,
        &mut |done, total, what| {
            if done == total {
                eprintln!("encoded {total} {what}");
            }
        },
    )?;
    if let Some(dir) = &args.init_unet {
        task.init_unet_from(dir)
            .with_context(|| format!("--init-unet {}", dir.display()))?;
        eprintln!("starting from the UNet weights in {}", dir.display());
    }
    let what = format!(
        "training a {}-parameter UNet2DConditionModel on {} ({} images, styles {}, {} prompts; encoding took {:.0} s)",
        task.num_parameters(),
        data.name,
        data.len(),
        task.styles().join(", "),
        task.num_prompts(),
        started.elapsed().as_secs_f64()
    );
    train_and_report(&mut task, &what, &data, &options, &device)
}

#[derive(Args)]
pub struct ClipArgs {
    /// The training config (model, recipe, run defaults), e.g. configs/clip-emoji.json.
    #[arg(long)]
    config: PathBuf,
    /// Captioned images: a WebDataset .tar, a folder of tars (each tar's name is a style), or a
    /// folder of images with .txt captions. Default: $ENSUENO_DATA/emoji.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The CLIP BPE tokenizer: a folder with vocab.json and merges.txt (e.g. a Stable Diffusion
    /// repository's tokenizer/ folder).
    #[arg(long, env = "ENSUENO_CLIP_TOKENIZER")]
    tokenizer: PathBuf,
    #[command(flatten)]
    run: ConfigRunArgs,
}

fn train_clip(args: ClipArgs) -> Result<()> {
    use ensueno::train::clip::{ClipTask, ClipTrainConfig};
    let config = ClipTrainConfig::from_file(&args.config)?;
    let device = pick_device(args.run.device)?;
    let path = data::resolve_data_path(args.data.as_deref(), "emoji")?;
    let size = config.model.vision_config.image_size;
    let data = data::open(&path, &config.recipe.load_options(size))
        .with_context(|| format!("cannot load the data in {}", path.display()))?;
    let run = &config.training;
    let options = args.run.options(run);
    let mut task = ClipTask::new(
        config,
        &args.tokenizer,
        &data,
        options.lr,
        options.seed,
        &device,
    )?;
    let what = format!(
        "training a {}-parameter CLIPModel on {} ({} images, styles {})",
        task.num_parameters(),
        data.name,
        data.len(),
        task.styles().join(", "),
    );
    train_and_report(&mut task, &what, &data, &options, &device)?;
    for s in task.last_scores() {
        let direction = match s.direction {
            ensueno::eval::zero_shot::Direction::ImageToText => "image -> caption",
            _ => "caption -> image",
        };
        println!(
            "zero-shot {direction} | {:>8} | n {} of {} | top-1 {:5.1}% | top-5 {:5.1}% | median rank {}",
            s.style,
            s.n,
            s.gallery,
            100. * s.top1,
            100. * s.top5,
            s.median_rank
        );
    }
    Ok(())
}

/// Says what is trained, trains it, and prints the final losses and where
/// the model is.
fn train_and_report(
    task: &mut dyn TrainTask,
    what: &str,
    data: &ImageDataset,
    options: &TrainOptions,
    device: &Device,
) -> Result<()> {
    eprintln!("{what}");
    let summary = run_task(task, data, options, device)?;
    report(&summary, &options.output);
    Ok(())
}

/// Runs a task with a progress bar on stderr.
pub fn run_task(
    task: &mut dyn TrainTask,
    data: &ImageDataset,
    options: &TrainOptions,
    device: &Device,
) -> Result<TrainSummary> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut epochs = options.epochs;
    let mut smoothed: Option<f64> = None;
    let started = Instant::now();
    let mut epoch_start = Instant::now();
    let summary = ensueno::train::train(task, data, options, device, &mut |event| match event {
        TrainEvent::Started {
            start_epoch,
            epochs: e,
            batches_per_epoch,
            ..
        } => {
            epochs = *e;
            bar.set_length(*batches_per_epoch as u64);
            bar.set_prefix(format!("{}/{}", start_epoch + 1, e));
        }
        TrainEvent::Resumed { epoch, step, .. } => {
            bar.suspend(|| eprintln!("resuming after epoch {epoch} (step {step})"));
        }
        TrainEvent::Step {
            epoch,
            batch,
            batches,
            names,
            losses,
            ..
        } => {
            if *batch == 0 {
                epoch_start = Instant::now();
            }
            let v = losses[0];
            let s = smoothed.map_or(v, |s| 0.95 * s + 0.05 * v);
            smoothed = Some(s);
            if bar.is_hidden() && (batch + 1) % 50 == 0 {
                // Not a terminal (a log file): a line now and then instead.
                eprintln!(
                    "epoch {} step {}/{}: {} {:.4} ({:.2} it/s)",
                    epoch + 1,
                    batch + 1,
                    batches,
                    names[0],
                    s,
                    (batch + 1) as f64 / epoch_start.elapsed().as_secs_f64()
                );
            }
            bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
            bar.set_position(*batch as u64 + 1);
            bar.set_message(format!("{} {:.4}", names[0], s));
        }
        TrainEvent::EpochEnd {
            epoch,
            names,
            mean_losses,
            seconds,
        } => {
            let parts: Vec<String> = names
                .iter()
                .zip(mean_losses.iter())
                .map(|(n, v)| format!("{n} {v:.5}"))
                .collect();
            bar.suspend(|| {
                eprintln!(
                    "epoch {}/{}: {} ({:.1} s)",
                    epoch + 1,
                    epochs,
                    parts.join(", "),
                    seconds
                )
            });
            bar.reset();
        }
        TrainEvent::Checkpoint { .. } => {}
    });
    bar.finish_and_clear();
    let summary = summary?;
    tracing::info!("trained in {:.1} s", started.elapsed().as_secs_f64());
    Ok(summary)
}

fn report(summary: &TrainSummary, output: &Path) {
    if let Some(last) = summary.epoch_losses.last() {
        let parts: Vec<String> = summary
            .loss_names
            .iter()
            .zip(last)
            .map(|(n, v)| format!("{n} {v:.5}"))
            .collect();
        eprintln!("final epoch: {}", parts.join(", "));
    }
    eprintln!(
        "model: {} (curves: {}/loss.csv, loss.png)",
        summary.model_dir.display(),
        output.display()
    );
}

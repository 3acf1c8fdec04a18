//! `ensueno eval`: score a trained generator with an independent classifier.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ensueno::data::{self, LoadOptions, Split};
use ensueno::eval::generative::evaluate_class_conditional;
use ensueno::pipelines::trained_model::{SampleSettings, TrainedModel};
use ensueno::schedulers::SchedulerKind;

use crate::generate::{parse_scheduler, pick_device, DeviceArg};

/// `ensueno eval --model DIR ...` (class-conditional models) or
/// `ensueno eval text2image ...`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalCommand {
    #[command(subcommand)]
    kind: Option<EvalKind>,
    #[command(flatten)]
    classes: EvalArgs,
}

#[derive(clap::Subcommand)]
enum EvalKind {
    /// Text-to-image retrieval: generate for training captions and unseen paraphrases, and check
    /// that the nearest real image (of all, per style) is the one named (top-1 / top-5).
    Text2image(crate::eval_text2image::Text2ImageEvalArgs),
    /// Zero-shot retrieval of a CLIP trained by `ensueno train clip`: caption or paraphrase ->
    /// image and image -> caption, among every item of the style (top-1 / top-5).
    Clip(crate::eval_clip::EncoderEvalArgs),
    /// Whether paraphrases land near their captions in a text encoder's sentence embeddings
    /// (a CLIP from `ensueno train clip`, or a BERT sentence encoder such as all-MiniLM-L6-v2).
    TextEncoder(crate::eval_clip::EncoderEvalArgs),
}

pub fn run(command: EvalCommand) -> Result<()> {
    match command.kind {
        Some(EvalKind::Text2image(args)) => crate::eval_text2image::run(args),
        Some(EvalKind::Clip(args)) => crate::eval_clip::run_clip(args),
        Some(EvalKind::TextEncoder(args)) => crate::eval_clip::run_text_encoder(args),
        None => run_classes(command.classes),
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// The class-conditional model to score (a folder written by `ensueno train`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The scoring classifier: the shared MNIST classifier (mnist.safetensors) or a folder written by
    /// `ensueno train classifier` (models/fashion-mnist-classifier). Default: $ENSUENO_CLASSIFIER.
    #[arg(long, env = "ENSUENO_CLASSIFIER")]
    classifier: Option<PathBuf>,
    /// The real data (train and test idx files) the model was trained on.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which known dataset --data holds: mnist or fashion-mnist.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Generated images (balanced over the classes).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Images generated per call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance_scale: Option<f64>,
    #[arg(long, value_parser = parse_scheduler)]
    scheduler: Option<SchedulerKind>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

fn run_classes(args: EvalArgs) -> Result<()> {
    let Some(model_dir) = &args.model else {
        bail!("no model: pass --model DIR (a class-conditional model), or use `ensueno eval text2image`");
    };
    let Some(classifier_path) = &args.classifier else {
        bail!(
            "no classifier: pass --classifier PATH or set ENSUENO_CLASSIFIER (MNIST: the shared \
             weights/mnist-classifier/mnist.safetensors; Fashion-MNIST: models/fashion-mnist-classifier)"
        );
    };
    let device = pick_device(args.device)?;
    let (model, dir) = TrainedModel::load(model_dir, &device)
        .with_context(|| format!("cannot load --model {}", model_dir.display()))?;
    let (classifier, classifier_classes) = ensueno::eval::load_classifier(classifier_path, &device)
        .with_context(|| format!("cannot load --classifier {}", classifier_path.display()))?;
    let names = model.class_names().to_vec();
    if names.is_empty() {
        bail!(
            "{} is unconditional: eval scores class-conditional models",
            dir.display()
        );
    }
    if names.len() != classifier_classes.len() {
        bail!(
            "the model has {} classes ({}) but the classifier {} ({})",
            names.len(),
            names.join(", "),
            classifier_classes.len(),
            classifier_classes.join(", ")
        );
    }
    let path = data::resolve_data_path(args.data.as_deref(), &args.dataset)?;
    let load = |split| {
        data::open(
            &path,
            &LoadOptions {
                split,
                ..LoadOptions::default()
            },
        )
        .with_context(|| format!("cannot load {}", path.display()))
    };
    let (test, train) = (load(Split::Test)?, load(Split::Train)?);
    let settings = SampleSettings {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler: args.scheduler,
    };
    let mut sample = |classes: &[u32], seed: u64| {
        model.sample(
            Some(classes),
            classes.len(),
            seed,
            &settings,
            &mut |_, _| Ok(()),
        )
    };
    let report = evaluate_class_conditional(
        &mut sample,
        &classifier,
        names.len(),
        args.n,
        args.batch,
        args.seed,
        &test,
        &train,
        &device,
    )?;
    println!("model: {}", dir.display());
    println!(
        "samples: {} ({:.1} s to generate)",
        report.samples, report.sampling_seconds
    );
    println!(
        "classifier accuracy on generated images: {:.2}%",
        100. * report.accuracy
    );
    let per: Vec<String> = names
        .iter()
        .zip(&report.per_class_accuracy)
        .map(|(n, a)| format!("{n}: {:.1}%", 100. * a))
        .collect();
    println!("  per class: {}", per.join(", "));
    println!(
        "classifier-FID vs the real test set: {:.3} (real-vs-real baseline, {} training images: {:.3}; ratio {:.2})",
        report.fid,
        report.samples,
        report.fid_real_baseline,
        report.fid / report.fid_real_baseline
    );
    println!(
        "the classifier's own accuracy on the real test set: {:.2}%",
        100. * report.classifier_test_accuracy
    );
    if let Some(json) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        ensueno::io::atomic::write_atomic(json, |w| {
            w.write_all(text.as_bytes())
                .map_err(|e| ensueno::Error::io(json, e))
        })?;
    }
    Ok(())
}

//! `ensueno eval text2image`: retrieval scores of a text-to-image model
//! trained on a captioned image set (see `ensueno::eval::retrieval`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use ensueno::data::{self, LoadOptions};
use ensueno::eval::retrieval::{
    build_cases, evaluate, summarize, CaseKind, GenerationSettings, Paraphrase,
};
use ensueno::io::model_folder::ModelFolder;
use ensueno::pipelines::prompting::{no_styles_error, PromptingConfig};
use ensueno::pipelines::{default_model_dir, StableDiffusionPipeline};
use ensueno::schedulers::SchedulerKind;
use ensueno::train::text2image::style_name;

use crate::generate::{parse_scheduler, pick_device, DeviceArg};

/// The hand-written paraphrases shipped with ensueno (emoji keys).
const EMOJI_PARAPHRASES: &str = include_str!("../../ensueno/assets/eval/emoji_paraphrases.json");

#[derive(Args)]
pub struct Text2ImageEvalArgs {
    /// The model (default: ensueno's own, models/emoji-text2image).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    cases: CaseArgs,
    /// Denoising steps (default: the model's).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (default: the model's).
    #[arg(long)]
    guidance_scale: Option<f64>,
    #[arg(long, default_value = "dpm++2m", value_parser = parse_scheduler)]
    scheduler: SchedulerKind,
    /// Also write every case and the scores as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

/// The flags that choose the evaluation cases, shared by `eval text2image`,
/// `eval clip` and `eval text-encoder`.
#[derive(Args, Clone)]
pub struct CaseArgs {
    /// The captioned images (default: $ENSUENO_DATA/emoji).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Cases per set (training captions, paraphrases) and style.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// A JSON list of {"key", "text"} paraphrases (default: the emoji list shipped with ensueno).
    #[arg(long)]
    pub paraphrases: Option<PathBuf>,
    /// Which cases are drawn.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Loads the data and draws the cases: `n` training captions and `n`
/// paraphrases per style (`styles`, or every style the data holds).
pub fn load_cases(
    args: &CaseArgs,
    options: &LoadOptions,
    styles: Option<&[String]>,
) -> Result<(
    ensueno::data::ImageDataset,
    Vec<ensueno::eval::retrieval::RetrievalCase>,
)> {
    let hand_written: Vec<Paraphrase> = match &args.paraphrases {
        Some(p) => ensueno::io::model_folder::read_json(p)?,
        None => serde_json::from_str(EMOJI_PARAPHRASES).context("the shipped paraphrase list")?,
    };
    let path = data::resolve_data_path(args.data.as_deref(), "emoji")?;
    let data =
        data::open(&path, options).with_context(|| format!("cannot load {}", path.display()))?;
    let styles = match styles {
        Some(s) => s.to_vec(),
        None => {
            let mut s: Vec<String> = data.sources.iter().map(|s| style_name(s)).collect();
            s.sort();
            s.dedup();
            s
        }
    };
    let cases = build_cases(
        &data,
        &styles,
        &|s: &str| style_name(s),
        &hand_written,
        args.n,
        args.seed,
    )?;
    Ok((data, cases))
}

pub fn run(args: Text2ImageEvalArgs) -> Result<()> {
    let root = match &args.model {
        Some(m) => m.clone(),
        None => default_model_dir()?,
    };
    let prompting = PromptingConfig::load(&root)?
        .ok_or_else(|| no_styles_error(&root.display().to_string()))?;
    let style_of = |s: &str| style_name(s);
    let (data, cases) = load_cases(
        &args.cases,
        &LoadOptions::default(),
        Some(&prompting.styles),
    )?;

    let device = pick_device(args.device)?;
    let folder = ModelFolder::open(
        &root,
        &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    )?;
    let pipeline = StableDiffusionPipeline::load(&folder, &device, DType::F32)
        .context("cannot load the model")?;
    let settings = GenerationSettings {
        steps: args.steps.unwrap_or(prompting.num_inference_steps),
        guidance_scale: args.guidance_scale.unwrap_or(prompting.guidance_scale),
        scheduler: args.scheduler,
        seed: args.cases.seed,
    };
    eprintln!(
        "generating {} images ({} steps, guidance {}) and ranking each among the {} images of its style",
        cases.len(),
        settings.steps,
        settings.guidance_scale,
        data.len() / prompting.styles.len().max(1)
    );
    let started = std::time::Instant::now();
    let results = evaluate(
        &pipeline,
        &prompting,
        &data,
        &cases,
        &settings,
        &style_of,
        &mut |done, total| {
            if done % 50 == 0 || done == total {
                eprintln!("{done}/{total}");
            }
        },
    )?;
    let scores = summarize(&results);
    println!("model: {}", root.display());
    println!(
        "{} cases in {:.0} s; feature space: 16x16 RGB box means, Euclidean",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    for s in &scores {
        let kind = match s.kind {
            CaseKind::Caption => "training captions",
            CaseKind::Paraphrase => "unseen paraphrases",
        };
        println!(
            "{kind:>18} | {:>8} | n {:>4} | top-1 {:5.1}% | top-5 {:5.1}% | median rank {}",
            s.style,
            s.n,
            100. * s.top1,
            100. * s.top5,
            s.median_rank
        );
    }
    if let Some(path) = &args.json {
        ensueno::io::atomic::write_json(
            path,
            &serde_json::json!({
                "model": root.display().to_string(),
                "settings": settings,
                "scores": scores,
                "cases": results,
            }),
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

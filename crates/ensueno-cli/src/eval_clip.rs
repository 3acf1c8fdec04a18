//! `ensueno eval clip` (zero-shot retrieval of a CLIP trained by `ensueno
//! train clip`) and `ensueno eval text-encoder` (whether paraphrases land
//! near their captions in a text encoder's sentence-embedding space), on the
//! cases of `ensueno eval text2image` (see `ensueno::eval::zero_shot`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use ensueno::data::LoadOptions;
use ensueno::eval::retrieval::CaseKind;
use ensueno::eval::zero_shot::{
    text_to_caption, ClipZeroShot, Direction, SentenceEmbedder, ZeroShotScore,
};
use ensueno::io::model_folder::ModelFolder;
use ensueno::pipelines::text_encoder::TextEncoder;
use ensueno::train::clip::{ClipRecipe, LoadedClip, OPENAI_CLIP_NORMALIZATION};
use ensueno::train::text2image::style_name;

use crate::eval_text2image::{load_cases, CaseArgs};
use crate::generate::{pick_device, DeviceArg};

/// The flags of `eval clip` and `eval text-encoder`.
#[derive(Args)]
pub struct EncoderEvalArgs {
    /// `eval clip`: a CLIP folder written by `ensueno train clip` (its model/ folder).
    /// `eval text-encoder`: such a CLIP, a sentence-transformers BERT folder (e.g.
    /// all-MiniLM-L6-v2), or a diffusers pipeline folder with a BERT text_encoder/ (e.g.
    /// models/emoji-text2image).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    cases: CaseArgs,
    /// Also write the scores as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

/// Tokens per text for a BERT sentence encoder read from a plain folder
/// (masked mean pooling: the padding length does not change the embedding).
const BERT_TOKENS: usize = 64;

fn is_clip_folder(dir: &Path) -> bool {
    let config = dir.join("config.json");
    std::fs::read_to_string(config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("model_type")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .is_some_and(|m| m == "clip")
}

fn recipe_of(clip: &LoadedClip) -> (usize, String) {
    let recipe: Option<&ClipRecipe> = clip.recipe.as_ref();
    let tokens = recipe
        .map(|r| r.max_text_tokens)
        .unwrap_or(clip.config.text_config.max_position_embeddings);
    let template = recipe
        .map(|r| r.style_template.clone())
        .unwrap_or_else(|| "{caption}, {style} style".to_string());
    (tokens, template)
}

fn print_scores(what: &str, scores: &[ZeroShotScore]) {
    println!("{what}");
    for s in scores {
        let direction = match s.direction {
            Direction::TextToImage => "text -> image",
            Direction::ImageToText => "image -> caption",
            Direction::TextToCaption => "text -> caption",
        };
        let kind = match s.kind {
            CaseKind::Caption => "training captions",
            CaseKind::Paraphrase => "unseen paraphrases",
        };
        println!(
            "{direction:>16} | {kind:>18} | {:>8} | n {:>4} of {} | top-1 {:5.1}% | top-5 {:5.1}% | median rank {}",
            s.style,
            s.n,
            s.gallery,
            100. * s.top1,
            100. * s.top5,
            s.median_rank
        );
    }
}

fn write_scores(path: Option<&PathBuf>, model: &Path, scores: &[ZeroShotScore]) -> Result<()> {
    if let Some(path) = path {
        ensueno::io::atomic::write_json(
            path,
            &serde_json::json!({"model": model.display().to_string(), "scores": scores}),
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub fn run_clip(args: EncoderEvalArgs) -> Result<()> {
    let device = pick_device(args.device)?;
    let clip = LoadedClip::load(&args.model, &device)
        .with_context(|| format!("cannot load the CLIP in {}", args.model.display()))?;
    let background = clip
        .recipe
        .as_ref()
        .map_or([255, 255, 255], |r| r.background);
    let size = clip.config.vision_config.image_size;
    let options = LoadOptions {
        background,
        size: Some((size, size)),
        ..LoadOptions::default()
    };
    let (data, cases) = load_cases(&args.cases, &options, None)?;
    let (max_tokens, template) = recipe_of(&clip);
    let eval = ClipZeroShot {
        model: &clip.model,
        tokenizer: &clip.tokenizer,
        max_tokens,
        norm: OPENAI_CLIP_NORMALIZATION,
    };
    let scores = eval.evaluate(&data, &cases, &|s| style_name(s), &|c| {
        template
            .replace("{caption}", &c.text)
            .replace("{style}", &c.style)
    })?;
    let text_side = text_to_caption(
        &SentenceEmbedder::Clip {
            model: &clip.model,
            tokenizer: &clip.tokenizer,
            max_tokens,
        },
        &data,
        &cases,
        &|s| style_name(s),
    )?;
    let mut all = scores;
    all.extend(text_side);
    print_scores(
        &format!(
            "CLIP {}: zero-shot retrieval by cosine similarity, among every item of the style",
            args.model.display()
        ),
        &all,
    );
    write_scores(args.json.as_ref(), &args.model, &all)
}

pub fn run_text_encoder(args: EncoderEvalArgs) -> Result<()> {
    let device = pick_device(args.device)?;
    // Only the captions are read: a small common size lets images of any
    // sizes load.
    let options = LoadOptions {
        size: Some((16, 16)),
        ..LoadOptions::default()
    };
    let (data, cases) = load_cases(&args.cases, &options, None)?;
    let dir = &args.model;
    let style_of = |s: &str| style_name(s);
    let scores = if is_clip_folder(dir) {
        let clip = LoadedClip::load(dir, &device)
            .with_context(|| format!("cannot load the CLIP in {}", dir.display()))?;
        let (max_tokens, _) = recipe_of(&clip);
        let embedder = SentenceEmbedder::Clip {
            model: &clip.model,
            tokenizer: &clip.tokenizer,
            max_tokens,
        };
        text_to_caption(&embedder, &data, &cases, &style_of)?
    } else {
        let encoder = if dir.join("model_index.json").is_file() {
            let folder = ModelFolder::open(dir, &["text_encoder", "tokenizer"])?;
            TextEncoder::load(&folder, &device, DType::F32)?
        } else {
            TextEncoder::bert_from_dir(dir, dir, BERT_TOKENS, &device, DType::F32)?
        };
        text_to_caption(&SentenceEmbedder::Bert(&encoder), &data, &cases, &style_of)
            .with_context(|| format!("text encoder {}", dir.display()))?
    };
    print_scores(
        &format!(
            "text encoder {}: each text's named caption among all captions of the style, by cosine similarity of sentence embeddings",
            dir.display()
        ),
        &scores,
    );
    write_scores(args.json.as_ref(), dir, &scores)
}

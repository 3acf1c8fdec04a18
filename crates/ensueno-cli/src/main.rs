//! `ensueno`: the command line. Thin glue over the `ensueno` library.

mod data;
mod eval;
mod eval_clip;
mod eval_text2image;
mod export;
mod generate;
mod sample;
mod serve;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ensueno",
    version,
    about = "Text-to-image generation with diffusion models"
)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a text prompt (txt2img), or from an image and a prompt (img2img).
    Generate(Box<generate::GenerateArgs>),
    /// Train a model from scratch (diffusion, vae, gan, text2image, clip, classifier).
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Sample a model trained by `ensueno train` (a class, a prompt naming a class, or unconditional).
    Sample(sample::SampleArgs),
    /// Score a model: class-conditional (classifier accuracy, classifier-FID) `eval text2image` (retrieval), `eval clip` (zero-shot retrieval), `eval text-encoder`.
    Eval(eval::EvalCommand),
    /// Copy a trained model folder, converting its weights (e.g. --dtype f16).
    Export(export::ExportArgs),
    /// Datasets: `ensueno data fetch mnist|fashion-mnist`.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Serve an HTTP API (AUTOMATIC1111-compatible and ensueno's own) and a web page.
    Serve(Box<serve::ServeArgs>),
}

fn main() -> ExitCode {
    ensueno::utils::tune_allocator();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENSUENO_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Train(command) => train::run(command),
        Command::Sample(args) => sample::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Data(command) => data::run(command),
        Command::Export(args) => export::run(args),
        Command::Serve(args) => serve::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined, as the brief asks of errors.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

//! `ensueno serve`: flags -> [`ensueno_server::ServerConfig`] -> the server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ensueno::io::hub::resolve_model;
use ensueno::pipelines::{default_model_dir, Limits};
use ensueno_server::ServerConfig;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. The default answers only this machine; use
    /// 0.0.0.0 to open it to the network (then set --api-token).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (7860 is AUTOMATIC1111's, so its clients find the server).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// A diffusers model folder or a Hugging Face repo id; default: ensueno's shipped model.
    #[arg(long, env = "ENSUENO_MODEL")]
    model: Option<String>,
    /// Where the job database (ensueno.db) and the images are kept.
    #[arg(long, default_value = "ensueno-data")]
    data_dir: PathBuf,
    /// Require `Authorization: Bearer TOKEN` on every endpoint but the web page.
    #[arg(long, env = "ENSUENO_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Jobs that may wait at once; beyond it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest width accepted.
    #[arg(long, default_value_t = 1024)]
    max_width: usize,
    /// Largest height accepted.
    #[arg(long, default_value_t = 1024)]
    max_height: usize,
    /// Most denoising steps accepted.
    #[arg(long, default_value_t = 150)]
    max_steps: usize,
    /// Most images per request.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Longest prompt accepted, in characters.
    #[arg(long, default_value_t = 4000)]
    max_prompt_chars: usize,
    /// Largest request body in MiB (init images arrive base64 in JSON).
    #[arg(long, default_value_t = 16)]
    max_body_mib: usize,
    /// Allow cross-origin requests from this origin (repeatable); CORS is off without it.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Style presets JSON file; default DATA_DIR/styles.json if present, else the built-in presets.
    #[arg(long)]
    styles: Option<PathBuf>,
    /// Engine threads, each with its own copy of the model.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let root = match &args.model {
        Some(spec) => resolve_model(spec)?,
        None => default_model_dir()?,
    };
    if args.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    if args
        .api_token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        anyhow::bail!("--api-token is empty");
    }
    let mut config = ServerConfig::new(root, args.data_dir);
    config.host = args.host;
    config.port = args.port;
    config.api_token = args.api_token;
    config.max_queue = args.max_queue;
    config.limits = Limits {
        max_width: args.max_width,
        max_height: args.max_height,
        max_steps: args.max_steps,
        max_batch: args.max_batch,
        max_prompt_chars: args.max_prompt_chars,
    };
    config.max_body_bytes = args
        .max_body_mib
        .checked_mul(1024 * 1024)
        .context("--max-body-mib is too large")?;
    config.cors_origins = args.cors_origins;
    config.styles_file = args.styles;
    config.workers = args.workers;
    ensueno_server::serve(config)
}

//! The server's settings (what `ensueno serve`'s flags fill in).

use std::path::PathBuf;

use ensueno::pipelines::Limits;

/// Everything [`crate::serve`] and [`crate::spawn`] need.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind; 127.0.0.1 unless the user asks for more.
    pub host: String,
    /// Port; 0 picks a free one (tests).
    pub port: u16,
    /// A diffusers model folder (already resolved to a local path).
    pub model: PathBuf,
    /// Where the job database and the images live.
    pub data_dir: PathBuf,
    /// When set, every endpoint but the web page needs `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// Jobs that may wait at once; more get 429 with `Retry-After`.
    pub max_queue: usize,
    /// Bounds on width, height, steps, batch and prompt length.
    pub limits: Limits,
    /// Largest request body in bytes (init images come base64 in JSON).
    pub max_body_bytes: usize,
    /// Origins allowed by CORS; empty = CORS off (same-origin only).
    pub cors_origins: Vec<String>,
    /// A style presets JSON file; else `DATA_DIR/styles.json` if present, else the built-in one.
    pub styles_file: Option<PathBuf>,
    /// Engine threads, each with its own copy of the model. 0 accepts jobs
    /// but runs none (tests of the queue use it).
    pub workers: usize,
    /// How long a synchronous A1111 call waits for its job, in seconds.
    pub sync_timeout_s: u64,
}

impl ServerConfig {
    /// Defaults for `model` and `data_dir`.
    pub fn new(model: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 7860,
            model: model.into(),
            data_dir: data_dir.into(),
            api_token: None,
            max_queue: 64,
            limits: Limits {
                max_width: 1024,
                max_height: 1024,
                max_steps: 150,
                max_batch: 8,
                max_prompt_chars: 4000,
            },
            max_body_bytes: 16 * 1024 * 1024,
            cors_origins: Vec::new(),
            styles_file: None,
            workers: 1,
            sync_timeout_s: 3600,
        }
    }
}

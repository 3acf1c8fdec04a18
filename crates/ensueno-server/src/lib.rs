//! ensueno's HTTP server (`ensueno serve`): an AUTOMATIC1111-compatible API
//! (`/sdapi/v1`), ensueno's own asynchronous job API (`/api`), a persistent
//! job queue in SQLite, live progress over Server-Sent Events, and a web page.
//!
//! Layout: [`store`] is the queue on disk, [`worker`] runs jobs on engine
//! threads, [`submit`] is the one way a job gets in, [`a1111`] and [`api`]
//! are the two HTTP faces, [`page`] the web page, [`auth`] the bearer-token
//! check, [`openapi`] the API description.

pub mod a1111;
pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod jobs;
pub mod openapi;
pub mod page;
pub mod store;
pub mod styles;
pub mod submit;
pub mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method};
use axum::routing::{get, post};
use axum::Router;
use candle_core::DType;
use ensueno::io::model_folder::ModelFolder;
use ensueno::pipelines::StableDiffusionPipeline;
use tower_http::cors::CorsLayer;

pub use config::ServerConfig;

use crate::error::ApiError;
use crate::store::Store;
use crate::styles::Style;
use crate::worker::Engine;

/// What the handlers know of the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// Native (width, height).
    pub default_size: (usize, usize),
    /// Pixels per latent: sizes must be multiples of it.
    pub factor: usize,
}

/// Shared by every handler.
pub struct AppState {
    pub config: ServerConfig,
    pub engine: Arc<Engine>,
    pub model: ModelInfo,
    pub styles: Vec<Style>,
}

/// Loads the model folder at `root` for one engine thread.
pub fn load_pipeline(root: &Path) -> anyhow::Result<StableDiffusionPipeline> {
    let folder = ModelFolder::open(
        root,
        &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    )
    .with_context(|| format!("cannot open the model {}", root.display()))?;
    let device = ensueno::utils::default_device();
    StableDiffusionPipeline::load(&folder, &device, DType::F32)
        .with_context(|| format!("cannot load the model {}", root.display()))
}

/// The router for `state` (all routes, auth, body limit, CORS).
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/skip", post(a1111::skip))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route(
            "/sdapi/v1/options",
            get(a1111::get_options).post(a1111::set_options),
        )
        .route("/sdapi/v1/scripts", get(a1111::scripts))
        .route("/sdapi/v1/sd-vae", get(a1111::empty_list))
        .route("/sdapi/v1/upscalers", get(a1111::empty_list))
        .route("/sdapi/v1/loras", get(a1111::empty_list))
        .route("/sdapi/v1/prompt-styles", get(page::a1111_styles))
        .route("/api/jobs", post(api::create_job))
        .route(
            "/api/jobs/{id}",
            get(api::get_job_handler).delete(api::cancel_job),
        )
        .route("/api/jobs/{id}/events", get(api::job_events))
        .route("/api/images/{file}", get(api::image))
        .route("/api/gallery", get(api::gallery))
        .route("/api/styles", get(api::styles))
        .route("/api/config", get(api::server_config))
        .route("/openapi.json", get(openapi::document))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let public = Router::new()
        .route("/", get(page::index))
        .route("/static/app.js", get(page::app_js))
        .route("/static/app.css", get(page::app_css))
        .route("/favicon.ico", get(page::favicon));
    let mut app = public
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_announced_body,
        ));
    if !state.config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .config
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                ]),
        );
    }
    app.with_state(state)
}

/// Refuses a body announced with `Content-Length` over the limit and
/// `Expect: 100-continue` before any of it is sent: the client waits for
/// this answer. A client that sends its body straight away is answered by
/// `DefaultBodyLimit` once the limit is read (answering it before reading
/// leaves it blocked writing a body nobody reads).
async fn limit_announced_body(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = request
        .headers()
        .get(axum::http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let max = state.config.max_body_bytes;
    if expects_continue && announced.is_some_and(|n| n > max as u64) {
        return ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is {} bytes; the length limit is {max} bytes (--max-body-mib)",
                announced.unwrap_or(0)
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// A started server: the state, and the engine threads.
struct Started {
    state: Arc<AppState>,
    workers: Vec<JoinHandle<()>>,
}

fn start(config: ServerConfig) -> anyhow::Result<Started> {
    if config.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    std::fs::create_dir_all(config.data_dir.join("images"))
        .and_then(|_| std::fs::create_dir_all(config.data_dir.join("inputs")))
        .with_context(|| {
            format!(
                "cannot create the data folder {}",
                config.data_dir.display()
            )
        })?;
    let styles = styles::load_styles(config.styles_file.as_deref(), &config.data_dir)?;
    let pipeline = load_pipeline(&config.model)?;
    let model = ModelInfo {
        name: pipeline.name.clone(),
        default_size: pipeline.default_size(),
        factor: pipeline.vae_scale_factor(),
    };
    let (store, requeued) = Store::open(&config.data_dir.join("ensueno.db"))?;
    if requeued > 0 {
        tracing::warn!("{requeued} interrupted job(s) go back to the queue");
    }
    let engine = Arc::new(Engine::new(
        Arc::new(store),
        config.data_dir.clone(),
        config.limits.clone(),
        config.workers,
    ));
    let mut workers = Vec::new();
    let mut first = Some(pipeline);
    for n in 0..config.workers {
        let engine = engine.clone();
        let pipeline = first.take();
        let root = config.model.clone();
        let handle = std::thread::Builder::new()
            .name(format!("ensueno-engine-{n}"))
            .spawn(move || {
                let pipeline = match pipeline {
                    Some(p) => p,
                    None => match load_pipeline(&root) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!("engine {n} cannot load the model: {e:#}");
                            return;
                        }
                    },
                };
                engine.work(pipeline);
            })
            .context("cannot start an engine thread")?;
        workers.push(handle);
    }
    let state = Arc::new(AppState {
        config,
        engine,
        model,
        styles,
    });
    Ok(Started { state, workers })
}

fn stop(started: Started) {
    started.state.engine.shut_down();
    for w in started.workers {
        let _ = w.join();
    }
}

/// Runs the server until Ctrl-C or SIGTERM (the CLI's `ensueno serve`).
pub fn serve(config: ServerConfig) -> anyhow::Result<()> {
    let addr = format!("{}:{}", config.host, config.port);
    let token = config.api_token.is_some();
    let loopback = matches!(config.host.as_str(), "127.0.0.1" | "::1" | "localhost");
    if !loopback && !token {
        eprintln!(
            "warning: listening on {} without --api-token: anyone who can reach this address can use the server",
            config.host
        );
    }
    let started = start(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let app = router(started.state.clone());
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "ensueno serve: http://{local}/ (model {}, data {}{})",
            started.state.model.name,
            started.state.config.data_dir.display(),
            if token { ", API token required" } else { "" }
        );
        tokio::select! {
            r = axum::serve(listener, app) => r.context("the server stopped"),
            _ = shutdown_signal() => {
                eprintln!("ensueno serve: stopping (a running job goes back to the queue)");
                Ok(())
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    stop(started);
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A server running on background threads (tests, embedding).
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the HTTP side and the engine threads (a running job goes back
    /// to the queue).
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Starts the server on background threads and returns once it listens.
pub fn spawn(config: ServerConfig) -> anyhow::Result<RunningServer> {
    let addr = format!("{}:{}", config.host, config.port);
    let started = start(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(started.state.clone());
    let thread = std::thread::Builder::new()
        .name("ensueno-http".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    r = axum::serve(listener, app) => {
                        if let Err(e) = r { tracing::error!("server stopped: {e}"); }
                    }
                    _ = rx => {}
                }
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            stop(started);
        })
        .context("cannot start the server thread")?;
    Ok(RunningServer {
        addr: local,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

//! Accepting a job: the one path both APIs and the web page go through.
//! Everything a client can get wrong (a bad init image, an unknown style, a
//! size out of bounds) is refused here with a 4xx and a message, before the
//! job is written to the queue; once written, it is "accepted" and survives a
//! crash.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ensueno::pipelines::GenerationRequest;
use tokio::sync::broadcast::error::RecvError;

use crate::error::{ApiError, ApiResult};
use crate::jobs::{new_job_id, JobRow, JobSpec, JobStatus};
use crate::store::Insert;
use crate::worker::JobEvent;
use crate::AppState;

/// The largest init image accepted, in pixels per side, before resizing.
pub const MAX_INIT_IMAGE_SIDE: u32 = 8192;

/// A job as a handler received it.
pub struct Submission {
    pub request: GenerationRequest,
    pub style: Option<String>,
    /// Base64 (optionally a `data:` URL) of a PNG/JPEG/WebP, for img2img.
    pub init_image: Option<String>,
    pub source: &'static str,
}

/// Validates, persists and queues a job; returns its id and queue position.
pub async fn submit(state: &Arc<AppState>, sub: Submission) -> ApiResult<(String, usize)> {
    let Submission {
        mut request,
        style,
        init_image,
        source,
    } = sub;
    let factor = state.model.factor;
    let init = match init_image {
        Some(b64) => {
            let img = tokio::task::spawn_blocking(move || decode_init_image(&b64))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))??;
            // Without an explicit size, img2img keeps the init image's (to the VAE grid).
            let limits = &state.config.limits;
            let (w, h) = (img.width() as usize, img.height() as usize);
            if request.width.is_none() && request.height.is_none() {
                let (rw, rh) = ((w / factor) * factor, (h / factor) * factor);
                if rw == 0 || rh == 0 || rw > limits.max_width || rh > limits.max_height {
                    return Err(ApiError::unprocessable(format!(
                        "the init image is {w}x{h}; without width and height it must be between \
                         {factor}x{factor} and {}x{} pixels (pass width and height to resize it)",
                        limits.max_width, limits.max_height
                    )));
                }
                request.width = Some(rw);
                request.height = Some(rh);
            }
            Some(img)
        }
        None => None,
    };
    let (prompt, negative_prompt) = match &style {
        Some(name) if !name.is_empty() => {
            let preset = crate::styles::find(&state.styles, name).ok_or_else(|| {
                ApiError::unprocessable(format!(
                    "unknown style '{name}'; the styles are: {}",
                    state
                        .styles
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            preset.apply(&request.prompt, &request.negative_prompt)
        }
        _ => (request.prompt.clone(), request.negative_prompt.clone()),
    };
    if request.seed.is_none() {
        // Drawn now, so that a job re-run after a crash makes the same images.
        request.seed = Some(rand::random::<u32>() as u64);
    }
    request
        .validate(&state.config.limits, factor)
        .map_err(|e| ApiError::unprocessable(e.to_string()))?;
    let mut styled = request.clone();
    styled.prompt = prompt.clone();
    styled.negative_prompt = negative_prompt.clone();
    styled
        .validate(&state.config.limits, factor)
        .map_err(|e| ApiError::unprocessable(format!("with the style applied, {e}")))?;

    let id = new_job_id();
    let spec = JobSpec {
        request,
        style: style.filter(|s| !s.is_empty()),
        prompt,
        negative_prompt,
        init_image: init.as_ref().map(|_| format!("{id}.png")),
        source: source.to_string(),
    };
    let st = state.clone();
    let job_id = id.clone();
    let inserted = tokio::task::spawn_blocking(move || -> anyhow::Result<Insert> {
        let input_path = init
            .as_ref()
            .map(|_| st.engine.inputs_dir().join(format!("{job_id}.png")));
        if let (Some(img), Some(path)) = (&init, &input_path) {
            ensueno::io::png_info::save_png_with_parameters(path, img, None)?;
        }
        let r = st
            .engine
            .store
            .insert(&job_id, &spec, st.config.max_queue)?;
        if let (Insert::Full(_), Some(path)) = (r, &input_path) {
            let _ = std::fs::remove_file(path);
        }
        Ok(r)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    match inserted {
        Insert::Queued(position) => {
            state.engine.notify();
            Ok((id, position))
        }
        Insert::Full(queued) => Err(ApiError::queue_full(
            queued,
            state.engine.retry_after(queued),
        )),
    }
}

/// Decodes a base64 image (plain or a `data:` URL) with bounds on its size.
pub fn decode_init_image(b64: &str) -> ApiResult<image::RgbImage> {
    let data = match b64.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => b64,
    };
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .map_err(|e| ApiError::unprocessable(format!("init image is not valid base64: {e}")))?;
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::unprocessable(format!("init image cannot be read: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INIT_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_INIT_IMAGE_SIDE);
    limits.max_alloc = Some(512 * 1024 * 1024);
    reader.limits(limits);
    if reader.format().is_none() {
        return Err(ApiError::unprocessable(
            "init image is not a PNG, JPEG, WebP or GIF image",
        ));
    }
    let img = reader
        .decode()
        .map_err(|e| ApiError::unprocessable(format!("init image cannot be decoded: {e}")))?;
    Ok(img.to_rgb8())
}

/// Reads a job (off the async threads).
pub async fn get_job(state: &Arc<AppState>, id: &str) -> ApiResult<Option<JobRow>> {
    let st = state.clone();
    let id = id.to_string();
    Ok(
        tokio::task::spawn_blocking(move || st.engine.store.get(&id))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??,
    )
}

/// Waits until job `id` is done, failed or cancelled, and returns it.
pub async fn wait_for_job(state: &Arc<AppState>, id: &str) -> ApiResult<JobRow> {
    let mut events = state.engine.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(state.config.sync_timeout_s);
    loop {
        match get_job(state, id).await? {
            Some(row) if row.status.is_final() => return Ok(row),
            Some(_) => {}
            None => return Err(ApiError::not_found(format!("no job {id}"))),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "job {id} is still waiting after {} s; it will still run: poll /api/jobs/{id}",
                    state.config.sync_timeout_s
                ),
            ));
        }
        // Events only say "look again"; the database has the truth, and a
        // missed event costs at most the timeout.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match events.recv().await {
                    Ok(JobEvent::Status { id: ev, status, .. })
                        if ev == id && status != JobStatus::Running =>
                    {
                        return
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return,
                    Err(RecvError::Closed) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        return;
                    }
                }
            }
        })
        .await;
    }
}

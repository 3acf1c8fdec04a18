//! ensueno's own asynchronous API (`/api/...`): submit a job and get its id
//! at once, then follow it (poll, or Server-Sent Events with a preview each
//! step), cancel it, fetch its images, page through the gallery.
//!
//! `POST /api/jobs` takes exactly [`GenerationRequest`]'s fields, plus
//! `init_image` (base64, for img2img) and `style` (a preset name).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ensueno::pipelines::GenerationRequest;
use ensueno::schedulers::SchedulerKind;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;

use crate::a1111::parse_json;
use crate::error::{ApiError, ApiResult};
use crate::jobs::{is_image_id, is_job_id, JobRow, JobStatus};
use crate::submit::{get_job, submit, Submission};
use crate::worker::JobEvent;
use crate::AppState;

fn check_job_id(id: &str) -> ApiResult<()> {
    if is_job_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid job id '{id}': a job id is 32 hex digits"
        )))
    }
}

/// `POST /api/jobs`.
pub async fn create_job(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let mut fields: Map<String, Value> = parse_json(body)?;
    let init_image = match fields.remove("init_image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(ApiError::unprocessable(
                "init_image must be a base64 string",
            ))
        }
    };
    let style = match fields.remove("style") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(ApiError::unprocessable("style must be a preset name")),
    };
    // JSON has one number type: `512.0` is the integer 512 to most clients.
    for key in ["steps", "width", "height", "seed", "batch", "clip_skip"] {
        if let Some(v) = fields.get_mut(key) {
            if let Some(f) = v
                .as_f64()
                .filter(|f| v.is_f64() && f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
            {
                *v = json!(f as u64);
            }
        }
    }
    let request: GenerationRequest = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::unprocessable(e.to_string()))?;
    let (id, position) = submit(
        &state,
        Submission {
            request,
            style,
            init_image,
            source: "api",
        },
    )
    .await?;
    let mut response = (
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": "queued", "position": position })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/jobs/{id}")) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// A job as the API shows it.
pub fn job_json(state: &AppState, row: &JobRow, position: Option<usize>) -> Value {
    let mut v = json!({
        "id": row.id,
        "status": row.status,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "error": row.error,
        "request": row.spec.request,
        "style": row.spec.style,
        "prompt_used": row.spec.prompt,
        "negative_prompt_used": row.spec.negative_prompt,
        "img2img": row.spec.init_image.is_some(),
    });
    if let Some(p) = position {
        v["position"] = json!(p);
    }
    if row.status == JobStatus::Running {
        if let Some(l) = state.engine.live_job(&row.id) {
            v["progress"] =
                json!({"step": l.step, "total": l.total, "eta": l.eta(), "fraction": l.fraction()});
        }
    }
    if let Some(r) = &row.result {
        v["images"] = json!(r
            .images
            .iter()
            .map(|i| format!("/api/images/{i}.png"))
            .collect::<Vec<_>>());
        v["image_ids"] = json!(r.images);
        v["seeds"] = json!(r.seeds);
        v["width"] = json!(r.width);
        v["height"] = json!(r.height);
        v["infotexts"] = json!(r.infotexts);
        v["warnings"] = json!(r.warnings);
        v["model"] = json!(r.model);
        v["seconds"] = json!(r.seconds);
    }
    v
}

async fn job_value(state: &Arc<AppState>, id: &str) -> ApiResult<Option<Value>> {
    let Some(row) = get_job(state, id).await? else {
        return Ok(None);
    };
    let position = if row.status == JobStatus::Queued {
        let st = state.clone();
        let id = id.to_string();
        Some(
            tokio::task::spawn_blocking(move || st.engine.store.position(&id))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))??,
        )
    } else {
        None
    };
    Ok(Some(job_json(state, &row, position)))
}

/// `GET /api/jobs/{id}`.
pub async fn get_job_handler(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    check_job_id(&id)?;
    job_value(&state, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

/// `DELETE /api/jobs/{id}`: cancels a job. A queued one is cancelled at once
/// (200); a running one stops at its next step (202: poll or follow its
/// events for the final `cancelled`). The job stays visible with its status.
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_job_id(&id)?;
    let st = state.clone();
    let job = id.clone();
    let outcome = tokio::task::spawn_blocking(move || st.engine.cancel(&job))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    match outcome {
        Some(JobStatus::Running) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": "running", "cancel_requested": true})),
        )
            .into_response()),
        Some(status) => Ok(Json(json!({"id": id, "status": status})).into_response()),
        None => match get_job(&state, &id).await? {
            Some(row) => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("job {id} is already {}", row.status.as_str()),
            )),
            None => Err(ApiError::not_found(format!("no job {id}"))),
        },
    }
}

/// `GET /api/jobs/{id}/events`: Server-Sent Events. `status` events carry
/// the job (as `GET /api/jobs/{id}` shows it); `progress` events carry
/// `{step, total, eta, preview}` with `preview` a base64 PNG. The stream
/// ends after the job's final status.
pub async fn job_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_job_id(&id)?;
    // Subscribe before reading the job, so no event falls in between.
    let mut events = state.engine.subscribe();
    let Some(first) = job_value(&state, &id).await? else {
        return Err(ApiError::not_found(format!("no job {id}")));
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(32);
    tokio::spawn(async move {
        let status_event = |v: &Value| Event::default().event("status").data(v.to_string());
        let is_final = |v: &Value| {
            v["status"]
                .as_str()
                .and_then(JobStatus::parse)
                .map(JobStatus::is_final)
                .unwrap_or(true)
        };
        if tx.send(Ok(status_event(&first))).await.is_err() || is_final(&first) {
            return;
        }
        if let Some(l) = state.engine.live_job(&id) {
            let v = json!({"id": id, "step": l.step, "total": l.total, "eta": l.eta(), "preview": l.preview.as_deref()});
            let _ = tx
                .send(Ok(Event::default().event("progress").data(v.to_string())))
                .await;
        }
        loop {
            let next = tokio::time::timeout(Duration::from_secs(2), events.recv()).await;
            let recheck = match next {
                Ok(Ok(JobEvent::Progress {
                    id: ev,
                    step,
                    total,
                    eta,
                    preview,
                })) if ev == id => {
                    let v = json!({"id": id, "step": step, "total": total, "eta": eta, "preview": preview.as_deref()});
                    if tx
                        .send(Ok(Event::default().event("progress").data(v.to_string())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    false
                }
                Ok(Ok(JobEvent::Status { id: ev, .. })) if ev == id => true,
                Ok(Ok(_)) => false,
                Ok(Err(RecvError::Lagged(_))) | Err(_) => true,
                Ok(Err(RecvError::Closed)) => return,
            };
            if tx.is_closed() {
                return;
            }
            if recheck {
                match job_value(&state, &id).await {
                    Ok(Some(v)) => {
                        let done = is_final(&v);
                        let changed = v["status"] != first["status"] || done;
                        if changed && tx.send(Ok(status_event(&v))).await.is_err() {
                            return;
                        }
                        if done {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `GET /api/images/{id}.png`.
pub async fn image(
    State(state): State<Arc<AppState>>,
    Path(file): Path<String>,
) -> ApiResult<Response> {
    let id = file.strip_suffix(".png").unwrap_or("");
    if !is_image_id(id) {
        return Err(ApiError::bad_request(format!(
            "invalid image name '{file}': expected <job id>-<n>.png"
        )));
    }
    let path = crate::worker::image_path(&state.engine.images_dir(), id);
    match tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        Ok(bytes) => Ok((
            [
                (header::CONTENT_TYPE, "image/png"),
                (
                    header::CACHE_CONTROL,
                    "private, max-age=31536000, immutable",
                ),
            ],
            Body::from(bytes),
        )
            .into_response()),
        Err(_) => Err(ApiError::not_found(format!("no image {file}"))),
    }
}

/// The last page number accepted (keeps OFFSET arithmetic small).
pub const MAX_PAGE: usize = 1_000_000;

#[derive(Debug, Deserialize)]
pub struct Page {
    /// 1-based page number.
    #[serde(default = "one")]
    pub page: usize,
    #[serde(default = "twenty")]
    pub per_page: usize,
}
fn one() -> usize {
    1
}
fn twenty() -> usize {
    20
}

/// `GET /api/gallery?page=1&per_page=20`: finished jobs, newest first.
pub async fn gallery(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Page>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(page) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if page.page == 0 || page.page > MAX_PAGE || page.per_page == 0 || page.per_page > 100 {
        return Err(ApiError::bad_request(format!(
            "page must be between 1 and {MAX_PAGE} and per_page between 1 and 100"
        )));
    }
    let offset = (page.page - 1).saturating_mul(page.per_page);
    let st = state.clone();
    let (total, rows) =
        tokio::task::spawn_blocking(move || st.engine.store.gallery(offset, page.per_page))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
    let items: Vec<Value> = rows.iter().map(|r| job_json(&state, r, None)).collect();
    Ok(Json(json!({
        "page": page.page,
        "per_page": page.per_page,
        "total": total,
        "pages": total.div_ceil(page.per_page),
        "items": items,
    })))
}

/// `GET /api/styles`.
pub async fn styles(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!(state.styles))
}

/// `GET /api/config`: what the page needs to build its form.
pub async fn server_config(State(state): State<Arc<AppState>>) -> Json<Value> {
    let (w, h) = state.model.default_size;
    Json(json!({
        "model": state.model.name,
        "default_width": w,
        "default_height": h,
        "size_multiple": state.model.factor,
        "limits": state.config.limits,
        "schedulers": SchedulerKind::ALL.map(|k| json!({"name": k.name(), "a1111_name": k.a1111_name()})),
        "default_request": GenerationRequest::new(""),
        "max_queue": state.config.max_queue,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

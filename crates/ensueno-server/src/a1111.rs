//! AUTOMATIC1111-compatible endpoints (`/sdapi/v1/...`): the same field
//! names and response shapes as A1111's web UI API, so existing clients (the
//! `webuiapi` package, editor plug-ins, bots) work unchanged.
//!
//! A1111's txt2img and img2img answer only when the images are made; here
//! they queue a job like every other (so it is persisted and survives a
//! crash) and wait for it. Fields ensueno has no use for (hires fix, face
//! restoration, scripts) are accepted and ignored, as A1111 ignores fields of
//! extensions it lacks.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use ensueno::pipelines::GenerationRequest;
use ensueno::schedulers::SchedulerKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{ApiError, ApiResult};
use crate::jobs::{JobRow, JobStatus};
use crate::submit::{submit, wait_for_job, Submission};
use crate::AppState;

/// A1111's `StableDiffusionProcessingTxt2Img` / `...Img2Img` fields that
/// ensueno uses. Integers are signed so that a negative size gets a clear
/// "must be between" message rather than a type error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct A1111Request {
    pub prompt: String,
    pub negative_prompt: String,
    /// Prompt style names; the first is looked up among ensueno's style presets.
    pub styles: Vec<String>,
    #[serde(deserialize_with = "whole_number")]
    pub seed: i64,
    pub sampler_name: Option<String>,
    pub sampler_index: Option<String>,
    /// A1111 1.9+: the noise schedule ("automatic", "karras").
    pub scheduler: Option<String>,
    #[serde(deserialize_with = "whole_number")]
    pub batch_size: i64,
    #[serde(deserialize_with = "whole_number")]
    pub n_iter: i64,
    #[serde(deserialize_with = "whole_number")]
    pub steps: i64,
    pub cfg_scale: f64,
    #[serde(deserialize_with = "optional_whole_number")]
    pub width: Option<i64>,
    #[serde(deserialize_with = "optional_whole_number")]
    pub height: Option<i64>,
    pub denoising_strength: Option<f64>,
    pub init_images: Vec<String>,
    pub override_settings: Map<String, Value>,
    /// Every other field, echoed back in `parameters`.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Default for A1111Request {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            styles: Vec::new(),
            seed: -1,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: 20,
            cfg_scale: 7.0,
            width: None,
            height: None,
            denoising_strength: None,
            init_images: Vec::new(),
            override_settings: Map::new(),
            other: Map::new(),
        }
    }
}

/// An integer, also written as a float with no fraction (`512.0`): Python
/// clients compute sizes in floats, and A1111 (pydantic) accepts them.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    as_whole_number(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn optional_whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => as_whole_number(&v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn as_whole_number(v: &Value) -> Result<i64, String> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(format!("invalid type: expected a whole number, got {v}")),
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The A1111 sampler (+ schedule) as one of ensueno's schedulers.
pub fn sampler_kind(sampler: Option<&str>, schedule: Option<&str>) -> ApiResult<SchedulerKind> {
    let Some(name) = sampler else {
        return Ok(SchedulerKind::EulerAncestral);
    };
    let kind: SchedulerKind = name.parse().map_err(|_| {
        ApiError::unprocessable(format!(
            "unknown sampler '{name}'; the samplers are: {}",
            SchedulerKind::ALL.map(|k| k.a1111_name()).join(", ")
        ))
    })?;
    match schedule.map(|s| s.to_ascii_lowercase()) {
        None => Ok(kind),
        Some(s) if s == "automatic" || s.is_empty() => Ok(kind),
        Some(s) if s == "karras" => Ok(match kind {
            SchedulerKind::DpmPlusPlus2M => SchedulerKind::DpmPlusPlus2MKarras,
            k => k,
        }),
        Some(s) => Err(ApiError::unprocessable(format!(
            "unknown scheduler '{s}'; the schedulers are: automatic, karras"
        ))),
    }
}

fn in_range(name: &str, v: i64, lo: i64, hi: i64) -> ApiResult<usize> {
    if v < lo || v > hi {
        return Err(ApiError::unprocessable(format!(
            "{name} must be between {lo} and {hi}, got {v}"
        )));
    }
    Ok(v as usize)
}

impl A1111Request {
    /// The ensueno request this asks for (field bounds are checked again,
    /// with the configured limits, when it is submitted).
    pub fn to_request(&self, state: &AppState, img2img: bool) -> ApiResult<GenerationRequest> {
        let limits = &state.config.limits;
        let mut r = GenerationRequest::new(self.prompt.clone());
        r.negative_prompt = self.negative_prompt.clone();
        r.steps = in_range("steps", self.steps, 1, limits.max_steps as i64)?;
        r.guidance_scale = self.cfg_scale;
        r.scheduler = sampler_kind(
            non_empty(&self.sampler_name).or(non_empty(&self.sampler_index)),
            non_empty(&self.scheduler),
        )?;
        if let Some(w) = self.width {
            r.width = Some(in_range("width", w, 1, limits.max_width as i64)?);
        }
        if let Some(h) = self.height {
            r.height = Some(in_range("height", h, 1, limits.max_height as i64)?);
        }
        let max_batch = limits.max_batch as i64;
        let batch_size = in_range("batch_size", self.batch_size, 1, max_batch)?;
        let n_iter = in_range("n_iter", self.n_iter, 1, max_batch)?;
        // A1111's n_iter batches run one after another with consecutive seeds:
        // the same images as one batch of batch_size * n_iter.
        r.batch = batch_size * n_iter;
        if r.batch > limits.max_batch {
            return Err(ApiError::unprocessable(format!(
                "batch_size * n_iter must be at most {}, got {batch_size} * {n_iter}",
                limits.max_batch
            )));
        }
        r.seed = (self.seed >= 0).then_some(self.seed as u64);
        if img2img {
            r.strength = self.denoising_strength.unwrap_or(0.75);
        }
        if let Some(v) = self.override_settings.get("sd_model_checkpoint") {
            let name = v.as_str().unwrap_or_default();
            check_model_name(state, name)?;
        }
        if let Some(v) = self.override_settings.get("CLIP_stop_at_last_layers") {
            let n = v.as_i64().ok_or_else(|| {
                ApiError::unprocessable("CLIP_stop_at_last_layers must be an integer")
            })?;
            r.clip_skip = in_range("CLIP_stop_at_last_layers", n, 1, 9)? - 1;
        }
        Ok(r)
    }
}

/// Accepts the loaded model's name (A1111 titles may add " [hash]"); refuses
/// anything else, and anything shaped like a path, with a 4xx.
pub fn check_model_name(state: &AppState, name: &str) -> ApiResult<()> {
    if name.contains('/') || name.contains('\\') || name.contains("..") || name.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "invalid model name '{name}': model names are not paths"
        )));
    }
    let bare = name.split(" [").next().unwrap_or(name).trim();
    if bare == state.model.name || name.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unprocessable(format!(
            "unknown model '{name}'; this server has: {}",
            state.model.name
        )))
    }
}

/// Reads a JSON body: unreadable -> 400, wrong fields -> 422.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<T> {
    let bytes = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::unprocessable("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::unprocessable(format!("{e}")))
}

pub async fn txt2img(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    generate(state, body, false).await
}

pub async fn img2img(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    generate(state, body, true).await
}

async fn generate(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    img2img: bool,
) -> ApiResult<Json<Value>> {
    let a: A1111Request = parse_json(body)?;
    let request = a.to_request(&state, img2img)?;
    let init_image = if img2img {
        Some(a.init_images.first().cloned().ok_or_else(|| {
            ApiError::unprocessable("img2img needs init_images: a list with a base64 image")
        })?)
    } else {
        None
    };
    let style = a.styles.first().cloned();
    let (id, _) = submit(
        &state,
        Submission {
            request,
            style,
            init_image,
            source: "a1111",
        },
    )
    .await?;
    let row = wait_for_job(&state, &id).await?;
    // A1111 clients that only want the files saved ask for no images back.
    let send_images = a.other.get("send_images").and_then(Value::as_bool) != Some(false);
    let images = match row.status {
        JobStatus::Done if send_images => read_images_base64(&state, &row).await?,
        JobStatus::Done => Vec::new(),
        JobStatus::Cancelled => Vec::new(),
        _ => {
            return Err(ApiError::internal(format!(
                "generation failed: {}",
                row.error.clone().unwrap_or_default()
            )))
        }
    };
    let parameters = serde_json::to_value(&a).unwrap_or(Value::Null);
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info_json(&state, &row, img2img).to_string(),
    })))
}

async fn read_images_base64(state: &Arc<AppState>, row: &JobRow) -> ApiResult<Vec<String>> {
    let dir = state.engine.images_dir();
    let ids = row
        .result
        .as_ref()
        .map(|r| r.images.clone())
        .unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| {
                let path = crate::worker::image_path(&dir, id);
                std::fs::read(&path)
                    .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
                    .map_err(|e| ApiError::internal(format!("cannot read {}: {e}", path.display())))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// A1111's `info`: the generation parameters as a JSON object (sent as a
/// string, as A1111 does).
fn info_json(state: &AppState, row: &JobRow, img2img: bool) -> Value {
    let spec = &row.spec;
    let r = &spec.request;
    let result = row.result.as_ref();
    let seeds: Vec<u64> = result
        .map(|x| x.seeds.clone())
        .unwrap_or_else(|| r.seed.into_iter().collect());
    let n = seeds.len().max(1);
    let (width, height) = result
        .map(|x| (x.width, x.height))
        .unwrap_or((r.width.unwrap_or(0), r.height.unwrap_or(0)));
    json!({
        "prompt": spec.prompt,
        "all_prompts": vec![spec.prompt.clone(); n],
        "negative_prompt": spec.negative_prompt,
        "all_negative_prompts": vec![spec.negative_prompt.clone(); n],
        "seed": seeds.first().copied().unwrap_or(0),
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": r.scheduler.a1111_name(),
        "cfg_scale": r.guidance_scale,
        "steps": r.steps,
        "batch_size": r.batch,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": state.model.name,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": if img2img { json!(r.strength) } else { Value::Null },
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": result.map(|x| x.infotexts.clone()).unwrap_or_default(),
        "styles": spec.style.iter().collect::<Vec<_>>(),
        "job_timestamp": timestamp(row.created_at),
        "clip_skip": r.clip_skip + 1,
        "is_using_inpainting_conditioning": false,
        "version": concat!("ensueno ", env!("CARGO_PKG_VERSION")),
        "job_id": row.id,
        "status": row.status,
        "error": row.error,
    })
}

/// `YYYYmmddHHMMSS` (UTC), A1111's job timestamp.
fn timestamp(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `GET /sdapi/v1/progress`.
pub async fn progress(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let live = state.engine.live();
    let st = state.clone();
    let queued = tokio::task::spawn_blocking(move || st.engine.store.count(JobStatus::Queued))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let current = live.first();
    let (progress, eta, job, step, steps, image) = match current {
        Some((id, l)) => (
            l.fraction(),
            l.eta(),
            id.clone(),
            l.step,
            l.total,
            l.preview.as_deref().map(str::to_string),
        ),
        None => (0.0, 0.0, String::new(), 0, 0, None),
    };
    Ok(Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": current.map(|(_, l)| l.cancel.load(std::sync::atomic::Ordering::SeqCst)).unwrap_or(false),
            "stopping_generation": false,
            "job": job,
            "job_count": queued + live.len(),
            "job_timestamp": timestamp(crate::jobs::now()),
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": image,
        "textinfo": null,
        "current_task": if job.is_empty() { Value::Null } else { json!(job) },
    })))
}

/// `POST /sdapi/v1/interrupt`: stops the running job(s) at their next step.
pub async fn interrupt(State(state): State<Arc<AppState>>) -> Json<Value> {
    let n = state.engine.interrupt_running();
    Json(json!({ "interrupted": n }))
}

/// `POST /sdapi/v1/skip`: A1111 skips to the next image of a batch; here
/// it is the same as interrupt.
pub async fn skip(state: State<Arc<AppState>>) -> Json<Value> {
    interrupt(state).await
}

pub async fn sd_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!([{
        "title": state.model.name,
        "model_name": state.model.name,
        "hash": null,
        "sha256": null,
        "filename": state.model.name,
        "config": null,
    }]))
}

pub async fn samplers() -> Json<Value> {
    let list: Vec<Value> = SchedulerKind::ALL
        .iter()
        .map(|k| {
            json!({
                "name": k.a1111_name(),
                "aliases": [k.name()],
                "options": {},
            })
        })
        .collect();
    Json(Value::Array(list))
}

pub async fn schedulers() -> Json<Value> {
    Json(json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false},
    ]))
}

pub async fn get_options(State(state): State<Arc<AppState>>) -> Json<Value> {
    let l = &state.config.limits;
    Json(json!({
        "sd_model_checkpoint": state.model.name,
        "sd_checkpoint_hash": null,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "live_previews_enable": true,
        "show_progress_every_n_steps": 1,
        "ensueno_limits": l,
    }))
}

/// `POST /sdapi/v1/options`: only the model can be "set", to the one loaded;
/// other options are accepted and ignored.
pub async fn set_options(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let options: Map<String, Value> = parse_json(body)?;
    if let Some(v) = options.get("sd_model_checkpoint") {
        check_model_name(&state, v.as_str().unwrap_or_default())?;
    }
    Ok(Json(Value::Null))
}

pub async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

pub async fn empty_list() -> Json<Value> {
    Json(json!([]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_samplers() {
        assert_eq!(timestamp(0.0), "19700101000000");
        assert_eq!(timestamp(1_700_000_000.0), "20231114221320");
        assert_eq!(
            sampler_kind(Some("DPM++ 2M"), Some("Karras")).unwrap(),
            SchedulerKind::DpmPlusPlus2MKarras
        );
        assert_eq!(
            sampler_kind(Some("Euler a"), Some("automatic")).unwrap(),
            SchedulerKind::EulerAncestral
        );
        assert!(sampler_kind(Some("LMS"), None).is_err());
        assert!(sampler_kind(Some("Euler"), Some("exponential")).is_err());
    }
}

//! The web page at `/`: a form (prompt, negative prompt, style preset, size,
//! steps, guidance, seed, scheduler, optional init image), a live preview
//! while it denoises, and a gallery with each image's parameters and "use
//! these settings again". Plain HTML, CSS and JavaScript, embedded in the
//! binary; it talks only to the `/api` endpoints.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::AppState;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// Only our own script and styles run; images may be data: (previews) and
/// blob: (images fetched with the API token) URLs.
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

pub async fn index() -> Response {
    (
        [
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(INDEX_HTML),
    )
        .into_response()
}

pub async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

pub async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

pub async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `GET /sdapi/v1/prompt-styles`: the presets in A1111's shape.
pub async fn a1111_styles(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(Value::Array(
        state
            .styles
            .iter()
            .map(|s| json!({"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}))
            .collect(),
    ))
}

//! The OpenAPI 3.1 description of the server, served at `/openapi.json`.
//! Written by hand beside the handlers (keep the two in step); the
//! integration tests check its main paths are listed.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use ensueno::schedulers::SchedulerKind;
use serde_json::{json, Value};

use crate::AppState;

fn error_responses() -> Value {
    let e = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({
        "400": e, "401": e, "404": e, "413": e, "422": e,
        "429": {"description": "queue full; see the Retry-After header", "headers": {"Retry-After": {"schema": {"type": "integer"}}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn with_errors(mut responses: Value) -> Value {
    if let (Some(r), Some(e)) = (responses.as_object_mut(), error_responses().as_object()) {
        for (k, v) in e {
            r.entry(k.clone()).or_insert(v.clone());
        }
    }
    responses
}

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn id_param() -> Value {
    json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}])
}

/// The document for this server: its limits, model, styles, and whether it
/// needs a token.
pub fn spec(state: &AppState) -> Value {
    let limits = &state.config.limits;
    let token = state.config.api_token.is_some();
    let model = state.model.name.as_str();
    let factor = state.model.factor;
    let styles: Vec<&str> = state.styles.iter().map(|s| s.name.as_str()).collect();
    let samplers: Vec<&str> = SchedulerKind::ALL
        .iter()
        .flat_map(|k| [k.a1111_name(), k.name()])
        .collect();
    let any = json!({"type": "object"});
    let list = json!({"type": "array", "items": {"type": "object"}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ensueno",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Text-to-image generation. /sdapi/v1 is compatible with AUTOMATIC1111's web UI API; /api is ensueno's asynchronous job API. With --api-token, send 'Authorization: Bearer <token>'."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "detail"], "properties": {
                    "error": {"type": "string"}, "detail": {"type": "string"}, "body": {"type": "string"}, "errors": {"type": "string"}}},
                "GenerationRequest": {"type": "object", "required": ["prompt"], "additionalProperties": false, "properties": {
                    "prompt": {"type": "string", "maxLength": limits.max_prompt_chars},
                    "negative_prompt": {"type": "string", "default": "", "maxLength": limits.max_prompt_chars},
                    "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps, "default": 25},
                    "guidance_scale": {"type": "number", "minimum": 0, "maximum": 100, "default": 7.5},
                    "scheduler": {"type": "string", "enum": ["ddim", "ddpm", "euler", "euler-a", "dpm++2m", "dpm++2m-karras"], "default": "dpm++2m"},
                    "width": {"type": ["integer", "null"], "minimum": factor, "maximum": limits.max_width, "multipleOf": factor},
                    "height": {"type": ["integer", "null"], "minimum": factor, "maximum": limits.max_height, "multipleOf": factor},
                    "seed": {"type": ["integer", "null"], "minimum": 0},
                    "batch": {"type": "integer", "minimum": 1, "maximum": limits.max_batch, "default": 1},
                    "strength": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.75},
                    "clip_skip": {"type": "integer", "minimum": 0, "maximum": 8, "default": 0},
                    "init_image": {"type": ["string", "null"], "description": "base64 PNG/JPEG/WebP (or a data: URL) for img2img"},
                    "style": {"type": ["string", "null"], "enum": styles.iter().map(|s| Some(*s)).chain([None]).collect::<Vec<_>>(), "description": "a style preset name (GET /api/styles)"}
                }},
                "Job": {"type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
                    "position": {"type": "integer"},
                    "progress": {"type": "object"},
                    "request": {"type": "object"},
                    "images": {"type": "array", "items": {"type": "string"}},
                    "seeds": {"type": "array", "items": {"type": "integer"}},
                    "error": {"type": ["string", "null"]}
                }},
                "A1111Request": {"type": "object", "properties": {
                    "prompt": {"type": "string", "maxLength": limits.max_prompt_chars},
                    "negative_prompt": {"type": "string", "maxLength": limits.max_prompt_chars},
                    "styles": {"type": "array", "items": {"type": "string", "enum": styles}},
                    "seed": {"type": "integer", "default": -1, "minimum": i64::MIN, "maximum": i64::MAX, "description": "negative = random"},
                    "sampler_name": {"type": "string", "enum": samplers},
                    "sampler_index": {"type": "string", "enum": samplers},
                    "scheduler": {"type": "string", "enum": ["automatic", "karras", "Automatic", "Karras"]},
                    "batch_size": {"type": "integer", "minimum": 1, "maximum": limits.max_batch, "default": 1},
                    "n_iter": {"type": "integer", "minimum": 1, "maximum": 1, "default": 1, "description": "images = batch_size * n_iter, at most the batch limit"},
                    "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps, "default": 20},
                    "cfg_scale": {"type": "number", "minimum": 0, "maximum": 100, "default": 7},
                    "width": {"type": ["integer", "null"], "minimum": factor, "maximum": limits.max_width, "multipleOf": factor},
                    "height": {"type": ["integer", "null"], "minimum": factor, "maximum": limits.max_height, "multipleOf": factor},
                    "denoising_strength": {"type": "number", "minimum": 0, "maximum": 1},
                    "init_images": {"type": "array", "items": {"type": "string", "description": "base64 PNG/JPEG/WebP"}},
                    "override_settings": {"type": "object", "properties": {
                        "sd_model_checkpoint": {"type": "string", "enum": [model]},
                        "CLIP_stop_at_last_layers": {"type": "integer", "minimum": 1, "maximum": 9}}}
                }},
                "A1111Img2ImgRequest": {"allOf": [{"$ref": "#/components/schemas/A1111Request"}, {"type": "object", "required": ["init_images"], "properties": {"init_images": {"type": "array", "minItems": 1, "items": {"type": "string", "description": "base64 PNG/JPEG/WebP"}}}}]},
                "A1111Response": {"type": "object", "required": ["images", "parameters", "info"], "properties": {
                    "images": {"type": "array", "items": {"type": "string", "description": "base64 PNG"}},
                    "parameters": {"type": "object"},
                    "info": {"type": "string", "description": "JSON text of the generation parameters"}
                }}
            }
        },
        "security": if token { json!([{"bearer": []}]) } else { json!([]) },
        "paths": {
            "/sdapi/v1/txt2img": {"post": {"summary": "Text to image (waits for the images)", "requestBody": body("A1111Request"),
                "responses": with_errors(json!({"200": ok("images", json!({"$ref": "#/components/schemas/A1111Response"}))}))}},
            "/sdapi/v1/img2img": {"post": {"summary": "Image to image (init_images, denoising_strength)", "requestBody": body("A1111Img2ImgRequest"),
                "responses": with_errors(json!({"200": ok("images", json!({"$ref": "#/components/schemas/A1111Response"}))}))}},
            "/sdapi/v1/progress": {"get": {"summary": "Progress of the running job", "responses": with_errors(json!({"200": ok("progress, eta_relative, state, current_image", any.clone())}))}},
            "/sdapi/v1/interrupt": {"post": {"summary": "Stop the running job", "responses": with_errors(json!({"200": ok("done", any.clone())}))}},
            "/sdapi/v1/skip": {"post": {"summary": "Same as interrupt", "responses": with_errors(json!({"200": ok("done", any.clone())}))}},
            "/sdapi/v1/sd-models": {"get": {"summary": "The loaded model", "responses": with_errors(json!({"200": ok("models", list.clone())}))}},
            "/sdapi/v1/samplers": {"get": {"summary": "Samplers", "responses": with_errors(json!({"200": ok("samplers", list.clone())}))}},
            "/sdapi/v1/schedulers": {"get": {"summary": "Noise schedules", "responses": with_errors(json!({"200": ok("schedules", list.clone())}))}},
            "/sdapi/v1/options": {
                "get": {"summary": "Options", "responses": with_errors(json!({"200": ok("options", any.clone())}))},
                "post": {"summary": "Set options (only sd_model_checkpoint, to the loaded model)", "requestBody": {"required": true, "content": {"application/json": {"schema": any.clone()}}}, "responses": with_errors(json!({"200": ok("null", json!({}))}))}
            },
            "/sdapi/v1/scripts": {"get": {"summary": "Scripts (none)", "responses": with_errors(json!({"200": ok("scripts", any.clone())}))}},
            "/sdapi/v1/sd-vae": {"get": {"summary": "VAEs (none to choose)", "responses": with_errors(json!({"200": ok("list", list.clone())}))}},
            "/sdapi/v1/upscalers": {"get": {"summary": "Upscalers (none)", "responses": with_errors(json!({"200": ok("list", list.clone())}))}},
            "/sdapi/v1/loras": {"get": {"summary": "LoRAs (none)", "responses": with_errors(json!({"200": ok("list", list.clone())}))}},
            "/sdapi/v1/prompt-styles": {"get": {"summary": "Style presets", "responses": with_errors(json!({"200": ok("styles", list.clone())}))}},
            "/api/jobs": {"post": {"summary": "Queue a job", "requestBody": body("GenerationRequest"),
                "responses": with_errors(json!({"202": ok("accepted", json!({"type": "object", "properties": {"id": {"type": "string"}, "status": {"type": "string"}, "position": {"type": "integer"}}}))}))}},
            "/api/jobs/{id}": {
                "get": {"summary": "A job", "parameters": id_param(), "responses": with_errors(json!({"200": ok("job", json!({"$ref": "#/components/schemas/Job"}))}))},
                "delete": {"summary": "Cancel a job: a queued one at once (200), a running one at its next step (202); the job stays, with status cancelled", "parameters": id_param(), "responses": with_errors(json!({"200": ok("cancelled", any.clone()), "202": ok("cancel requested; still running", any.clone()), "409": ok("already finished", json!({"$ref": "#/components/schemas/Error"}))}))}
            },
            "/api/jobs/{id}/events": {"get": {"summary": "Server-Sent Events: 'status' (the job) and 'progress' ({step,total,eta,preview}) until the job ends", "parameters": id_param(),
                "responses": with_errors(json!({"200": {"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "object", "properties": {"event": {"type": "string", "enum": ["status", "progress"]}, "data": {"type": "string", "contentMediaType": "application/json"}}}}}}}))}},
            "/api/images/{file}": {"get": {"summary": "An image, <job id>-<n>.png", "parameters": [{"name": "file", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}-[0-9]{1,4}\\.png$"}}],
                "responses": with_errors(json!({"200": {"description": "PNG", "content": {"image/png": {}}}}))}},
            "/api/gallery": {"get": {"summary": "Finished jobs, newest first", "parameters": [
                {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": crate::api::MAX_PAGE, "default": 1}},
                {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}],
                "responses": with_errors(json!({"200": ok("page", any.clone())}))}},
            "/api/styles": {"get": {"summary": "Style presets", "responses": with_errors(json!({"200": ok("styles", list.clone())}))}},
            "/api/config": {"get": {"summary": "Model, sizes, limits, schedulers", "responses": with_errors(json!({"200": ok("config", any.clone())}))}},
            "/openapi.json": {"get": {"summary": "This document", "responses": with_errors(json!({"200": ok("OpenAPI", any)}))}}
        }
    })
}

pub async fn document(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(spec(&state))
}

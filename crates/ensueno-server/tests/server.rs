//! End-to-end tests of the HTTP server: each test starts a server on
//! 127.0.0.1:0 with the tiny random-weight Stable Diffusion fixture and a
//! fresh data folder, and talks to it over real HTTP.

use std::io::{BufRead, BufReader, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ensueno_server::{spawn, RunningServer, ServerConfig};
use serde_json::{json, Value};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ensueno/tests/fixtures/pipeline/tiny-sd1")
}

fn config(data: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(tiny_model(), data);
    c.port = 0;
    c
}

fn start(c: ServerConfig) -> RunningServer {
    spawn(c).expect("server starts")
}

/// (status, headers we look at, body as JSON or as a string).
struct Reply {
    status: u16,
    retry_after: Option<String>,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

fn call(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> Reply {
    let mut req = agent().request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    Reply {
        status: resp.status(),
        retry_after: resp.header("Retry-After").map(str::to_string),
        content_type: resp.content_type().to_string(),
        body: resp.into_string().unwrap_or_default(),
    }
}

fn get(s: &RunningServer, path: &str) -> Reply {
    call("GET", &format!("{}{path}", s.url()), None, None)
}

fn post(s: &RunningServer, path: &str, body: &str) -> Reply {
    call("POST", &format!("{}{path}", s.url()), Some(body), None)
}

fn decode_png(b64: &str) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    assert_eq!(&bytes[1..4], b"PNG");
    image::load_from_memory(&bytes).expect("a PNG")
}

fn png_base64(w: u32, h: u32) -> String {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn wait_final(s: &RunningServer, id: &str, timeout: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let r = get(s, &format!("/api/jobs/{id}"));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        if ["done", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "job {id} still {} after {timeout:?}",
            v["status"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn txt2img_answers_like_a1111() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path()));
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        r#"{"prompt":"a red fox","negative_prompt":"blurry","steps":2,"width":64.0,"height":48,
            "seed":7,"batch_size":2,"sampler_name":"Euler a","cfg_scale":5,"enable_hr":false}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for img in images {
        let img = decode_png(img.as_str().unwrap());
        assert_eq!((img.width(), img.height()), (64, 48));
    }
    assert_eq!(v["parameters"]["prompt"], "a red fox");
    assert_eq!(
        v["parameters"]["enable_hr"], false,
        "unknown fields are echoed"
    );
    let info: Value = serde_json::from_str(v["info"].as_str().expect("info is a string")).unwrap();
    assert_eq!(info["seed"], 7);
    assert_eq!(info["all_seeds"], json!([7, 8]));
    assert_eq!(info["sampler_name"], "Euler a");
    assert_eq!(info["steps"], 2);
    assert_eq!(info["cfg_scale"], 5.0);
    assert_eq!(info["negative_prompt"], "blurry");
    assert!(info["infotexts"][0].as_str().unwrap().contains("Seed: 7"));

    let quiet = post(
        &s,
        "/sdapi/v1/txt2img",
        r#"{"prompt":"q","steps":1,"send_images":false}"#,
    )
    .json();
    assert_eq!(quiet["images"], json!([]));

    // The first job shows in the gallery, pages of one.
    let g = get(&s, "/api/gallery?page=2&per_page=1").json();
    assert_eq!(
        (g["total"].as_u64(), g["pages"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(g["items"][0]["seeds"], json!([7, 8]));
    let url = g["items"][0]["images"][1].as_str().unwrap().to_string();
    let png = get(&s, &url);
    assert_eq!((png.status, png.content_type.as_str()), (200, "image/png"));
    assert_eq!(get(&s, "/api/gallery?page=0").status, 400);

    // The A1111 listing endpoints.
    let models = get(&s, "/sdapi/v1/sd-models").json();
    assert_eq!(models[0]["title"], "tiny-sd1");
    let samplers = get(&s, "/sdapi/v1/samplers").json();
    assert!(samplers
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "DPM++ 2M Karras"));
    assert_eq!(
        get(&s, "/sdapi/v1/options").json()["sd_model_checkpoint"],
        "tiny-sd1"
    );
    let p = get(&s, "/sdapi/v1/progress").json();
    for key in ["progress", "eta_relative", "state", "current_image"] {
        assert!(p.get(key).is_some(), "progress lacks {key}: {p}");
    }
    assert_eq!(post(&s, "/sdapi/v1/interrupt", "").status, 200);
    let doc = get(&s, "/openapi.json").json();
    for path in [
        "/sdapi/v1/txt2img",
        "/api/jobs",
        "/api/jobs/{id}/events",
        "/api/gallery",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
}

#[test]
fn img2img_uses_the_init_image() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path()));
    let body = json!({
        "prompt": "a blue house", "steps": 4, "denoising_strength": 0.5, "seed": 3,
        "init_images": [format!("data:image/png;base64,{}", png_base64(40, 36))],
    });
    let r = post(&s, "/sdapi/v1/img2img", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let img = decode_png(v["images"][0].as_str().unwrap());
    // No size given: the init image's, rounded down to multiples of 8.
    assert_eq!((img.width(), img.height()), (40, 32));
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.5);

    // The own API takes the same image as `init_image`.
    let r = post(
        &s,
        "/api/jobs",
        &json!({"prompt": "x", "steps": 2.0, "init_image": png_base64(64, 64), "strength": 0.6, "width": 64, "height": 64}).to_string(),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let job = wait_final(
        &s,
        r.json()["id"].as_str().unwrap(),
        Duration::from_secs(30),
    );
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["img2img"], true);
}

#[test]
fn bad_inputs_get_4xx_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.max_body_bytes = 1 << 20;
    let s = start(c);
    let garbage = "@@@not base64@@@";
    let not_an_image = base64::engine::general_purpose::STANDARD.encode(b"hello, not an image");
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "POST",
            "/sdapi/v1/txt2img",
            "{\"prompt\": ".into(),
            400,
            "not valid JSON",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            "[1,2]".into(),
            422,
            "JSON object",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","width":-64}"#.into(),
            422,
            "width must be between",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","height":100000}"#.into(),
            422,
            "height must be between",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","width":60}"#.into(),
            422,
            "multiple of 8",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","steps":0}"#.into(),
            422,
            "steps",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","steps":"many"}"#.into(),
            422,
            "invalid type",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","width":64.5}"#.into(),
            422,
            "whole number",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","seed":18446744073709551615}"#.into(),
            422,
            "whole number",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","sampler_name":"LMS Foo"}"#.into(),
            422,
            "unknown sampler",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","batch_size":1000}"#.into(),
            422,
            "batch_size",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","styles":["No Such Style"]}"#.into(),
            422,
            "unknown style",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","override_settings":{"sd_model_checkpoint":"../../etc/passwd"}}"#
                .into(),
            400,
            "not paths",
        ),
        (
            "POST",
            "/sdapi/v1/txt2img",
            r#"{"prompt":"x","override_settings":{"sd_model_checkpoint":"other-model"}}"#.into(),
            422,
            "unknown model",
        ),
        (
            "POST",
            "/sdapi/v1/options",
            r#"{"sd_model_checkpoint":"..\\..\\x"}"#.into(),
            400,
            "not paths",
        ),
        (
            "POST",
            "/sdapi/v1/img2img",
            format!(r#"{{"prompt":"x","init_images":["{garbage}"]}}"#),
            422,
            "base64",
        ),
        (
            "POST",
            "/sdapi/v1/img2img",
            format!(r#"{{"prompt":"x","init_images":["{not_an_image}"]}}"#),
            422,
            "init image",
        ),
        (
            "POST",
            "/sdapi/v1/img2img",
            r#"{"prompt":"x"}"#.into(),
            422,
            "init_images",
        ),
        (
            "POST",
            "/sdapi/v1/img2img",
            r#"{"prompt":"x","init_images":[],"denoising_strength":2}"#.into(),
            422,
            "init_images",
        ),
        (
            "POST",
            "/api/jobs",
            r#"{"prompt":"x","sampler":"euler"}"#.into(),
            422,
            "unknown field",
        ),
        (
            "POST",
            "/api/jobs",
            r#"{"prompt":"x","scheduler":"lms"}"#.into(),
            422,
            "unknown variant",
        ),
        (
            "POST",
            "/api/jobs",
            r#"{"prompt":"x","width":-8}"#.into(),
            422,
            "invalid value",
        ),
        (
            "POST",
            "/api/jobs",
            r#"{"prompt":"x","strength":1.5}"#.into(),
            422,
            "strength",
        ),
        (
            "POST",
            "/api/jobs",
            r#"{"prompt":"x","init_image":"!!!"}"#.into(),
            422,
            "base64",
        ),
        (
            "GET",
            "/api/images/..%2F..%2Fensueno.db",
            String::new(),
            400,
            "invalid image name",
        ),
        (
            "GET",
            "/api/images/..%2Fensueno.png",
            String::new(),
            400,
            "invalid image name",
        ),
        (
            "GET",
            "/api/jobs/..%2F..%2Fetc",
            String::new(),
            400,
            "invalid job id",
        ),
        (
            "GET",
            "/api/images/0123456789abcdef0123456789abcdef-0.png",
            String::new(),
            404,
            "no image",
        ),
        (
            "GET",
            "/api/jobs/0123456789abcdef0123456789abcdef",
            String::new(),
            404,
            "no job",
        ),
        (
            "DELETE",
            "/api/jobs/0123456789abcdef0123456789abcdef",
            String::new(),
            404,
            "no job",
        ),
        (
            "GET",
            "/no/such/endpoint",
            String::new(),
            404,
            "no such endpoint",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let url = format!("{}{path}", s.url());
        let r = call(
            method,
            &url,
            (method != "GET" && method != "DELETE").then_some(body.as_str()),
            None,
        );
        assert_eq!(
            r.status,
            status,
            "{method} {path} {}: {}",
            &body[..body.len().min(80)],
            r.body
        );
        let v = r.json();
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(needle),
            "{method} {path}: '{detail}' should contain '{needle}'"
        );
        assert!(v["error"].is_string(), "{}", r.body);
    }
    // A body over the limit: announced with Content-Length and
    // `Expect: 100-continue`, the server answers 413 before the body is sent
    // (a client that sends it anyway may see the connection closed under it).
    let mut tcp = std::net::TcpStream::connect(s.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        2 << 20
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("length limit"), "{answer}");

    // None of them made a job, and the server still works.
    assert_eq!(get(&s, "/api/gallery").json()["total"], 0);
    let r = post(&s, "/sdapi/v1/txt2img", r#"{"prompt":"x","steps":1}"#);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn api_token_guards_everything_but_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.api_token = Some("s3cret-token".into());
    let s = start(c);
    let page = get(&s, "/");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<html"),
        "{}",
        &page.body[..100.min(page.body.len())]
    );
    assert_eq!(get(&s, "/static/app.js").status, 200);
    for path in [
        "/sdapi/v1/sd-models",
        "/api/gallery",
        "/openapi.json",
        "/api/styles",
    ] {
        let r = get(&s, path);
        assert_eq!(r.status, 401, "{path}");
        assert!(r.json()["detail"].as_str().unwrap().contains("Bearer"));
        let url = format!("{}{path}", s.url());
        assert_eq!(call("GET", &url, None, Some("wrong")).status, 401, "{path}");
        assert_eq!(
            call("GET", &url, None, Some("s3cret-token")).status,
            200,
            "{path}"
        );
    }
    let r = post(&s, "/sdapi/v1/txt2img", r#"{"prompt":"x","steps":1}"#);
    assert_eq!(r.status, 401);
}

#[test]
fn full_queue_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.workers = 0;
    c.max_queue = 2;
    let s = start(c);
    for _ in 0..2 {
        assert_eq!(
            post(&s, "/api/jobs", r#"{"prompt":"x","steps":1}"#).status,
            202
        );
    }
    let r = post(&s, "/api/jobs", r#"{"prompt":"x","steps":1}"#);
    assert_eq!(r.status, 429, "{}", r.body);
    let retry: u64 = r.retry_after.clone().expect("Retry-After").parse().unwrap();
    assert!(retry >= 1);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    let r = post(&s, "/sdapi/v1/txt2img", r#"{"prompt":"x","steps":1}"#);
    assert_eq!(r.status, 429);
}

#[test]
fn accepted_jobs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    {
        // A server that accepts but runs nothing, then goes away.
        let mut c = config(dir.path());
        c.workers = 0;
        let s = start(c);
        for n in 0..3 {
            let r = post(
                &s,
                "/api/jobs",
                &json!({"prompt": format!("job {n}"), "steps": 2, "seed": n}).to_string(),
            );
            assert_eq!(r.status, 202, "{}", r.body);
            ids.push(r.json()["id"].as_str().unwrap().to_string());
        }
        assert_eq!(
            get(&s, &format!("/api/jobs/{}", ids[2])).json()["position"],
            2
        );
        s.shutdown();
    }
    {
        // A crash in the middle of a job leaves it 'running' in the database.
        let (store, _) =
            ensueno_server::store::Store::open(&dir.path().join("ensueno.db")).unwrap();
        let claimed = store.claim_next().unwrap().unwrap();
        assert_eq!(claimed.id, ids[0]);
        assert_eq!(
            store.get(&ids[0]).unwrap().unwrap().status.as_str(),
            "running"
        );
    }
    let s = start(config(dir.path()));
    for (n, id) in ids.iter().enumerate() {
        let job = wait_final(&s, id, Duration::from_secs(60));
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["seeds"], json!([n]));
        assert_eq!(job["request"]["prompt"], format!("job {n}"));
    }
}

#[test]
fn cancel_queued_and_running_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path()));
    // A long job keeps the one worker busy while the second waits.
    let long = post(
        &s,
        "/api/jobs",
        r#"{"prompt":"slow","steps":150,"width":256,"height":256}"#,
    )
    .json();
    let queued = post(&s, "/api/jobs", r#"{"prompt":"never","steps":1}"#).json();
    let (long, queued) = (long["id"].as_str().unwrap(), queued["id"].as_str().unwrap());
    let url = |id: &str| format!("{}/api/jobs/{id}", s.url());
    let r = call("DELETE", &url(queued), None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        wait_final(&s, queued, Duration::from_secs(5))["status"],
        "cancelled"
    );
    assert_eq!(call("DELETE", &url(queued), None, None).status, 409);
    // Wait until the long one runs, then cancel it.
    let t0 = Instant::now();
    while get(&s, &format!("/api/jobs/{long}")).json()["status"] != "running" {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    // A1111's progress shows the running job with a preview.
    let t0 = Instant::now();
    let p = loop {
        let p = get(&s, "/sdapi/v1/progress").json();
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 1 {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{p}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(p["state"]["job"], long);
    assert_eq!(p["state"]["sampling_steps"], 150);
    assert!(p["progress"].as_f64().unwrap() > 0.0);
    decode_png(p["current_image"].as_str().expect("current_image"));
    let r = call("DELETE", &url(long), None, None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["cancel_requested"], true);
    let job = wait_final(&s, long, Duration::from_secs(30));
    assert_eq!(job["status"], "cancelled", "{job}");
}

#[test]
fn events_stream_progress_with_previews() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path()));
    // A job ahead in line, so the watched one is still queued when we subscribe.
    let first = post(
        &s,
        "/api/jobs",
        r#"{"prompt":"ahead","steps":20,"width":128,"height":128}"#,
    )
    .json();
    let r = post(
        &s,
        "/api/jobs",
        r#"{"prompt":"watched","steps":4,"style":"Watercolor"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let resp = agent()
        .get(&format!("{}/api/jobs/{id}/events", s.url()))
        .call()
        .unwrap();
    assert_eq!(resp.content_type(), "text/event-stream");
    let reader = BufReader::new(resp.into_reader());
    let mut event = String::new();
    let mut statuses = Vec::new();
    let mut steps = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).unwrap();
            match event.as_str() {
                "status" => {
                    statuses.push(v["status"].as_str().unwrap().to_string());
                    if v["status"] == "done" {
                        assert!(v["prompt_used"]
                            .as_str()
                            .unwrap()
                            .contains("watercolor painting of watched"));
                        assert_eq!(v["images"].as_array().unwrap().len(), 1);
                    }
                }
                "progress" => {
                    steps.push(v["step"].as_u64().unwrap());
                    let img = decode_png(v["preview"].as_str().expect("a preview"));
                    assert!(img.width() > 0);
                }
                other => panic!("unexpected event {other}"),
            }
        }
    }
    assert_eq!(
        statuses.first().map(String::as_str),
        Some("queued"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("done"),
        "{statuses:?}"
    );
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_eq!(
        wait_final(&s, first["id"].as_str().unwrap(), Duration::from_secs(60))["status"],
        "done"
    );
}

#[test]
fn cors_is_off_unless_an_origin_is_allowed() {
    let preflight = |s: &RunningServer| {
        agent()
            .request("OPTIONS", &format!("{}/api/jobs", s.url()))
            .set("Origin", "http://example.test")
            .set("Access-Control-Request-Method", "POST")
            .call()
            .map(|r| r.header("Access-Control-Allow-Origin").map(str::to_string))
            .unwrap_or_else(|e| match e {
                ureq::Error::Status(_, r) => {
                    r.header("Access-Control-Allow-Origin").map(str::to_string)
                }
                e => panic!("{e}"),
            })
    };
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path()));
    assert_eq!(preflight(&s), None);
    s.shutdown();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.cors_origins = vec!["http://example.test".into()];
    let s = start(c);
    assert_eq!(preflight(&s).as_deref(), Some("http://example.test"));
}

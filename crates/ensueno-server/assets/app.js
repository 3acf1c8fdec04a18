// ensueno's web page: a form that queues a job through /api/jobs, follows it
// over Server-Sent Events (read with fetch, so the API token can be sent as a
// header), shows the live preview, and a gallery that can refill the form.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, styles: [], job: null, page: 1, pages: 1, initImage: null, objectUrls: [] };

function token() {
  return localStorage.getItem("ensueno-token") || "";
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const r = await fetch(path, opts);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { detail: text }; }
  if (!r.ok) {
    const msg = (body && (body.detail || body.error)) || r.statusText;
    const err = new Error(r.status + ": " + msg);
    err.status = r.status;
    throw err;
  }
  return body;
}

async function imageUrl(path) {
  // <img src> cannot send the token, so images come through fetch as blobs.
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) throw new Error("cannot load " + path + ": " + r.status);
  const url = URL.createObjectURL(await r.blob());
  state.objectUrls.push(url);
  return url;
}

function showError(e) {
  $("error").textContent = e ? String(e.message || e) : "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.appendChild(o);
}

async function loadConfig() {
  try {
    state.config = await api("/api/config");
    state.styles = await api("/api/styles");
  } catch (e) {
    showError(e.status === 401 ? "This server needs an API token: enter it above." : e);
    $("token-box").open = true;
    return false;
  }
  showError(null);
  const c = state.config;
  $("model").textContent = "model: " + c.model;
  for (const id of ["width", "height"]) {
    $(id).step = c.size_multiple;
    $(id).max = id === "width" ? c.limits.max_width : c.limits.max_height;
  }
  $("width").placeholder = c.default_width;
  $("height").placeholder = c.default_height;
  $("steps").max = c.limits.max_steps;
  $("batch").max = c.limits.max_batch;
  $("steps").value = c.default_request.steps;
  $("guidance_scale").value = c.default_request.guidance_scale;
  const sched = $("scheduler");
  sched.textContent = "";
  for (const s of c.schedulers) option(sched, s.name, s.a1111_name);
  sched.value = c.default_request.scheduler;
  const style = $("style");
  style.textContent = "";
  option(style, "", "(no style)");
  for (const s of state.styles) if (s.name !== "None") option(style, s.name, s.name);
  await loadGallery();
  return true;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function readForm() {
  const req = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance_scale").value),
    scheduler: $("scheduler").value,
    width: numberOrNull("width"),
    height: numberOrNull("height"),
    seed: numberOrNull("seed"),
    batch: Number($("batch").value || 1),
    strength: Number($("strength").value),
  };
  if ($("style").value) req.style = $("style").value;
  if (state.initImage) req.init_image = state.initImage;
  return req;
}

function fillForm(job) {
  const r = job.request;
  $("prompt").value = r.prompt;
  $("negative_prompt").value = r.negative_prompt || "";
  $("steps").value = r.steps;
  $("guidance_scale").value = r.guidance_scale;
  $("scheduler").value = r.scheduler;
  $("width").value = r.width == null ? "" : r.width;
  $("height").value = r.height == null ? "" : r.height;
  $("seed").value = r.seed == null ? "" : r.seed;
  $("batch").value = r.batch;
  $("strength").value = r.strength;
  $("strength_out").textContent = r.strength;
  $("style").value = job.style || "";
  window.scrollTo({ top: 0, behavior: "smooth" });
  setStatus("Settings restored from job " + job.id.slice(0, 8) + ".");
}

async function showResult(job) {
  const box = $("result");
  box.textContent = "";
  for (const path of job.images || []) {
    const img = document.createElement("img");
    img.alt = job.request.prompt;
    img.className = "result-image";
    img.src = await imageUrl(path);
    box.appendChild(img);
  }
}

async function follow(id) {
  // SSE over fetch: "event: name" / "data: json" blocks separated by blank lines.
  const r = await fetch("/api/jobs/" + id + "/events", { headers: headers() });
  if (!r.ok || !r.body) throw new Error("cannot follow the job: " + r.status);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      const v = JSON.parse(data);
      if (event === "progress") {
        $("progress").value = v.total ? v.step / v.total : 0;
        setStatus("Step " + v.step + " / " + v.total + (v.eta ? ", about " + v.eta.toFixed(1) + " s left" : ""));
        if (v.preview) {
          $("preview").src = "data:image/png;base64," + v.preview;
          $("preview").hidden = false;
        }
      } else if (event === "status") {
        last = v;
        if (v.status === "queued") setStatus("Queued" + (v.position != null ? " (" + v.position + " ahead)" : ""));
        if (v.status === "running") setStatus("Running…");
      }
    }
  }
  return last;
}

async function generate(ev) {
  ev.preventDefault();
  showError(null);
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("preview").hidden = true;
  try {
    const accepted = await api("/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(readForm()),
    });
    state.job = accepted.id;
    setStatus("Queued");
    let job = await follow(accepted.id);
    if (!job || !["done", "failed", "cancelled"].includes(job.status)) {
      job = await api("/api/jobs/" + accepted.id);
    }
    if (job.status === "done") {
      $("progress").value = 1;
      setStatus("Done in " + (job.seconds || 0).toFixed(1) + " s, seed " + job.seeds.join(", "));
      $("preview").hidden = true;
      await showResult(job);
      await loadGallery(1);
    } else if (job.status === "failed") {
      showError("The job failed: " + job.error);
      setStatus("");
    } else {
      setStatus("Cancelled.");
    }
  } catch (e) {
    showError(e);
    setStatus("");
  } finally {
    state.job = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  if (!state.job) return;
  try {
    await api("/api/jobs/" + state.job, { method: "DELETE" });
  } catch (e) {
    showError(e);
  }
}

function describe(dl, label, value) {
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dl.append(dt, dd);
}

async function loadGallery(page) {
  if (page) state.page = page;
  let g;
  try {
    g = await api("/api/gallery?page=" + state.page + "&per_page=12");
  } catch (e) {
    showError(e);
    return;
  }
  for (const url of state.objectUrls.splice(0)) URL.revokeObjectURL(url);
  state.pages = Math.max(1, g.pages);
  $("page").textContent = "page " + g.page + " of " + state.pages + " (" + g.total + " jobs)";
  $("prev").disabled = g.page <= 1;
  $("next").disabled = g.page >= state.pages;
  const box = $("gallery");
  box.textContent = "";
  for (const job of g.items) {
    const card = document.createElement("div");
    card.className = "card";
    for (const path of job.images || []) {
      const img = document.createElement("img");
      img.alt = job.request.prompt;
      img.loading = "lazy";
      imageUrl(path).then((u) => { img.src = u; }).catch(() => {});
      card.appendChild(img);
    }
    const dl = document.createElement("dl");
    describe(dl, "prompt", job.request.prompt);
    if (job.request.negative_prompt) describe(dl, "negative", job.request.negative_prompt);
    if (job.style) describe(dl, "style", job.style);
    describe(dl, "size", job.width + "×" + job.height);
    describe(dl, "steps", job.request.steps + " (" + job.request.scheduler + ")");
    describe(dl, "guidance", job.request.guidance_scale);
    describe(dl, "seed", (job.seeds || []).join(", "));
    if (job.img2img) describe(dl, "img2img", "strength " + job.request.strength);
    card.appendChild(dl);
    const again = document.createElement("button");
    again.type = "button";
    again.className = "reuse";
    again.textContent = "Use these settings again";
    again.addEventListener("click", () => fillForm(job));
    card.appendChild(again);
    box.appendChild(card);
  }
}

function readInitImage() {
  const file = $("init_image").files[0];
  if (!file) { state.initImage = null; return; }
  const reader = new FileReader();
  reader.onload = () => { state.initImage = String(reader.result); };
  reader.onerror = () => showError("cannot read " + file.name);
  reader.readAsDataURL(file);
}

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
$("init_image").addEventListener("change", readInitImage);
$("clear_image").addEventListener("click", () => { $("init_image").value = ""; state.initImage = null; });
$("strength").addEventListener("input", () => { $("strength_out").textContent = $("strength").value; });
$("prev").addEventListener("click", () => loadGallery(Math.max(1, state.page - 1)));
$("next").addEventListener("click", () => loadGallery(Math.min(state.pages, state.page + 1)));
$("token").value = token();
$("token").addEventListener("change", () => {
  localStorage.setItem("ensueno-token", $("token").value.trim());
  loadConfig();
});
loadConfig();

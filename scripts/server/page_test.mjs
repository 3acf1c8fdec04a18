// Headless-Chromium test of the web page served by `ensueno serve`.
//
// Starts the server (tiny random-weight model, a fresh data folder), opens
// the page in Debian's Chromium through playwright-core, types a prompt,
// picks a style, clicks Generate, waits for the live preview and then for
// the image, checks the gallery and "use these settings again", then runs
// an img2img job by uploading the first image.
//
// Usage (from the repository root):
//   cargo build -p ensueno-cli && (cd scripts/server && npm install)
//   node scripts/server/page_test.mjs
// Env: ENSUENO_BIN (default target/debug/ensueno, or $CARGO_TARGET_DIR/debug/ensueno),
//      CHROMIUM (default /usr/bin/chromium).
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../..");
const bin = process.env.ENSUENO_BIN ||
  path.join(process.env.CARGO_TARGET_DIR || path.join(repo, "target"), "debug", "ensueno");
const model = path.join(repo, "crates/ensueno/tests/fixtures/pipeline/tiny-sd1");
const port = 20000 + Math.floor(Math.random() * 20000);
const base = `http://127.0.0.1:${port}`;
const data = mkdtempSync(path.join(tmpdir(), "ensueno-page-"));
const out = path.join(here, "out");
mkdirSync(out, { recursive: true });

function check(cond, what) {
  if (!cond) throw new Error("FAILED: " + what);
  console.log("ok -", what);
}

const server = spawn(bin, ["serve", "--model", model, "--data-dir", data, "--port", String(port)], {
  stdio: ["ignore", "inherit", "inherit"],
});
let browser;
try {
  const t0 = Date.now();
  for (;;) {
    try { if ((await fetch(base + "/")).ok) break; } catch (_) {}
    if (Date.now() - t0 > 60000) throw new Error("the server did not start");
    await new Promise((r) => setTimeout(r, 200));
  }
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(base + "/");
  await page.waitForFunction(() => document.querySelectorAll("#style option").length > 20);
  const styles = await page.locator("#style option").count();
  check(styles > 20, `style picker offers ${styles - 1} presets`);
  check((await page.locator("#scheduler option").count()) === 6, "scheduler picker lists 6 schedulers");

  await page.fill("#prompt", "a lighthouse on a cliff at dawn");
  await page.fill("#negative_prompt", "blurry");
  await page.selectOption("#style", "Watercolor");
  await page.fill("#width", "128");
  await page.fill("#height", "128");
  await page.fill("#steps", "30");
  await page.fill("#seed", "1234");
  const started = Date.now();
  await page.click("#generate");
  await page.waitForFunction(() => {
    const p = document.getElementById("preview");
    return !p.hidden && p.src.startsWith("data:image/png;base64,");
  }, null, { timeout: 120000 });
  check(true, "a live preview appeared while denoising");
  await page.waitForFunction(() => {
    const img = document.querySelector("#result img");
    return img && img.complete && img.naturalWidth > 0;
  }, null, { timeout: 120000 });
  const seconds = (Date.now() - started) / 1000;
  const size = await page.evaluate(() => {
    const img = document.querySelector("#result img");
    return [img.naturalWidth, img.naturalHeight];
  });
  check(size[0] === 128 && size[1] === 128, `the image appeared (${size[0]}x${size[1]}) after ${seconds.toFixed(1)} s`);
  check((await page.textContent("#status")).includes("seed 1234"), "status reports the seed");
  await page.waitForSelector("#gallery .card img");
  const card = page.locator("#gallery .card").first();
  const text = await card.textContent();
  check(text.includes("a lighthouse on a cliff at dawn") && text.includes("Watercolor") && text.includes("1234"),
    "gallery card shows prompt, style and seed");
  await page.screenshot({ path: path.join(out, "page.png"), fullPage: true });

  // "Use these settings again" refills the form.
  await page.fill("#prompt", "something else");
  await page.selectOption("#style", "");
  await card.locator("button.reuse").click();
  check(await page.inputValue("#prompt") === "a lighthouse on a cliff at dawn", "reuse restores the prompt");
  check(await page.inputValue("#style") === "Watercolor", "reuse restores the style");
  check(await page.inputValue("#seed") === "1234", "reuse restores the seed");

  // img2img: upload the image just made.
  const imgPath = path.join(out, "init.png");
  const b64 = await page.evaluate(async () => {
    const g = await (await fetch("/api/gallery")).json();
    const b = await (await fetch(g.items[0].images[0])).arrayBuffer();
    let s = ""; const a = new Uint8Array(b);
    for (let i = 0; i < a.length; i++) s += String.fromCharCode(a[i]);
    return btoa(s);
  });
  writeFileSync(imgPath, Buffer.from(b64, "base64"));
  await page.setInputFiles("#init_image", imgPath);
  await page.waitForFunction(() => true);
  await page.fill("#width", "");
  await page.fill("#height", "");
  await page.fill("#steps", "8");
  await page.fill("#prompt", "the same lighthouse at night");
  await page.waitForTimeout(300);
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelectorAll("#gallery .card").length >= 2
    && document.querySelector("#gallery .card").textContent.includes("at night"), null, { timeout: 120000 });
  const first = await page.locator("#gallery .card").first().textContent();
  check(first.includes("img2img"), "img2img job from an uploaded image is in the gallery");
  check(consoleErrors.length === 0, "no errors in the browser console" + (consoleErrors.length ? ": " + consoleErrors.join("; ") : ""));
  console.log(`PASS page test (first image in ${seconds.toFixed(1)} s)`);
} catch (e) {
  console.error(String(e && e.stack || e));
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  server.kill("SIGTERM");
  await new Promise((r) => server.on("exit", r));
  rmSync(data, { recursive: true, force: true });
}

"""The PyPI client `webuiapi` (written for AUTOMATIC1111's web UI) against
`ensueno serve`, unchanged: txt2img, img2img, batch, samplers and schedules,
models, options, progress, interrupt, errors, and the API token.

Usage (from the repository root, after `cargo build -p ensueno-cli` and
`/root/venvs/ensueno/bin/pip install webuiapi`):
    /root/venvs/ensueno/bin/python scripts/server/webuiapi_test.py
Env: ENSUENO_BIN (default $CARGO_TARGET_DIR/debug/ensueno or target/debug/ensueno).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import webuiapi

REPO = Path(__file__).resolve().parents[2]
BIN = os.environ.get("ENSUENO_BIN") or str(
    Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "ensueno"
)
MODEL = REPO / "crates/ensueno/tests/fixtures/pipeline/tiny-sd1"


def start(port, data, *extra):
    proc = subprocess.Popen(
        [BIN, "serve", "--model", str(MODEL), "--data-dir", str(data), "--port", str(port), *extra]
    )
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except Exception:
            if time.time() - t0 > 60 or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the server did not start")
            time.sleep(0.2)


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok - {what}")


def main():
    data = Path(tempfile.mkdtemp(prefix="ensueno-webuiapi-"))
    port = random.randint(20000, 40000)
    proc = start(port, data)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)
        check(api.util_get_model_names() == ["tiny-sd1"], "util_get_model_names")
        check("DPM++ 2M Karras" in api.util_get_sampler_names(), "util_get_sampler_names")
        check("karras" in api.util_get_scheduler_names(), "util_get_scheduler_names")
        check(api.util_get_current_model() == "tiny-sd1", "util_get_current_model")
        api.util_set_model("tiny-sd1")

        t0 = time.time()
        r = api.txt2img(prompt="cute squirrel", negative_prompt="ugly", seed=1003,
                        cfg_scale=7, width=64, height=64)
        dt = time.time() - t0
        check(r.image.size == (64, 64), f"txt2img gives a 64x64 PIL image ({dt:.2f} s)")
        check(r.info["seed"] == 1003 and r.info["all_seeds"] == [1003], "info carries the seed")
        check(r.info["sampler_name"] == "Euler a" and r.info["steps"] == 4, "info carries sampler and steps")
        check(r.parameters["prompt"] == "cute squirrel", "parameters echo the request")
        check("Seed: 1003" in r.image.info.get("parameters", ""), "the PNG has A1111's parameters text")

        r2 = api.txt2img(prompt="two foxes", seed=5, batch_size=2, width=64, height=48,
                         sampler_name="DPM++ 2M", scheduler="Karras")
        check(len(r2.images) == 2 and r2.images[1].size == (64, 48), "batch_size=2 gives two images")
        check(r2.info["all_seeds"] == [5, 6], "batch seeds are consecutive")
        check(r2.info["sampler_name"] == "DPM++ 2M Karras", "sampler + Karras schedule")

        r3 = api.img2img(images=[r.image], prompt="a squirrel in snow", denoising_strength=0.5,
                         seed=9, width=64, height=64)
        check(r3.image.size == (64, 64), "img2img with a PIL init image")
        check(r3.info["denoising_strength"] == 0.5, "img2img info has denoising_strength")

        p = api.get_progress()
        check(all(k in p for k in ("progress", "eta_relative", "state", "current_image")), "get_progress shape")
        check(isinstance(api.interrupt(), dict), "interrupt answers JSON")
        check(api.get_options()["sd_model_checkpoint"] == "tiny-sd1", "get_options")

        try:
            api.txt2img(prompt="x", sampler_name="No Such Sampler", width=64, height=64)
            check(False, "an unknown sampler is refused")
        except RuntimeError as e:
            status, text = e.args
            check(status == 422 and "unknown sampler" in json.loads(text)["detail"],
                  "an unknown sampler is refused with 422 and a message")
    finally:
        proc.terminate()
        proc.wait()

    # With --api-token: the client sends it as a session header.
    port = random.randint(20000, 40000)
    proc = start(port, data, "--api-token", "tok-123")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=2)
        try:
            api.txt2img(prompt="x", width=64, height=64)
            check(False, "no token is refused")
        except RuntimeError as e:
            check(e.args[0] == 401, "no token: 401")
        api.session.headers["Authorization"] = "Bearer tok-123"
        r = api.txt2img(prompt="with token", width=64, height=64)
        check(r.image.size == (64, 64), "with the token: txt2img works")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)
    print("PASS webuiapi test (webuiapi %s)" % getattr(webuiapi, "__version__", "?"))


if __name__ == "__main__":
    sys.exit(main())

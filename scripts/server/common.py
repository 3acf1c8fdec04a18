"""Helpers shared by the server scripts: start `ensueno serve`, HTTP calls
with the standard library only, RSS of a process from /proc."""

import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "crates/ensueno/tests/fixtures/pipeline/tiny-sd1"


def binary():
    return os.environ.get("ENSUENO_BIN") or str(
        Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "ensueno"
    )


def start_server(data, *extra, port=None):
    """Starts the server; returns (process, base url)."""
    port = port or random.randint(20000, 40000)
    proc = subprocess.Popen(
        [binary(), "serve", "--model", str(MODEL), "--data-dir", str(data), "--port", str(port), *extra],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(base + "/", timeout=2)
            return proc, base
        except Exception:
            if time.time() - t0 > 60 or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the server did not start")
            time.sleep(0.1)


def call(method, url, body=None, raw=None, timeout=600):
    """Returns (status, headers, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, text = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, text = e.code, dict(e.headers), e.read()
    try:
        return status, headers, json.loads(text)
    except Exception:
        return status, headers, text


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None

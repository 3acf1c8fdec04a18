"""Load test of `ensueno serve`: 200 concurrent requests, 50 of them
malformed (bad JSON, negative or huge sizes, unknown sampler, garbage
base64, an over-limit body, path traversal). Checks that every malformed one
gets a 4xx with a message, that every valid one completes, and samples the
server's RSS from /proc every 50 ms.

Valid requests: 75 A1111 txt2img and 25 img2img (synchronous), 50 ensueno
/api/jobs (asynchronous, then polled). A client that gets 429 waits for
Retry-After and tries again (what a well-behaved client does), so the test
also runs with a queue smaller than the burst (--max-queue 64).

Usage (from the repository root, after `cargo build -p ensueno-cli`):
    /root/venvs/ensueno/bin/python scripts/server/load_test.py [--max-queue N] [--json OUT]
"""

import argparse
import base64
import io
import json
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from common import call, rss_kib, start_server


def tiny_png(w, h):
    """A w x h RGB PNG, standard library only."""
    raw = b"".join(b"\x00" + bytes((x * 7 + y * 3) % 256 for x in range(w * 3)) for y in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def requests_list():
    init = base64.b64encode(tiny_png(64, 64)).decode()
    valid = []
    for i in range(75):
        valid.append(("txt2img", "POST", "/sdapi/v1/txt2img",
                      {"prompt": f"load {i}", "steps": 4, "width": 64, "height": 64, "seed": i,
                       "sampler_name": random.choice(["Euler a", "Euler", "DPM++ 2M", "DDIM"])}))
    for i in range(25):
        valid.append(("img2img", "POST", "/sdapi/v1/img2img",
                      {"prompt": f"img {i}", "steps": 4, "init_images": [init],
                       "denoising_strength": 0.6, "seed": i}))
    for i in range(50):
        valid.append(("api", "POST", "/api/jobs",
                      {"prompt": f"async {i}", "steps": 4, "width": 64, "height": 64, "seed": i,
                       "scheduler": "euler-a"}))
    bad = []
    for i in range(10):
        bad.append(("bad-json", "POST", random.choice(["/sdapi/v1/txt2img", "/api/jobs"]),
                    random.choice([b'{"prompt": ', b"not json", b'{"prompt": "x",}', b"\xff\xfe"])))
    for i in range(8):
        bad.append(("negative-size", "POST", "/sdapi/v1/txt2img",
                    {"prompt": "x", "width": -64 * (i + 1), "height": 64}))
    for i in range(8):
        bad.append(("huge-size", "POST", random.choice(["/sdapi/v1/txt2img", "/api/jobs"]),
                    {"prompt": "x", "width": 10 ** (5 + i), "height": 10 ** (5 + i)}))
    for i in range(8):
        bad.append(("unknown-sampler", "POST", "/sdapi/v1/txt2img",
                    {"prompt": "x", "sampler_name": f"Nonexistent {i}"}))
    for i in range(8):
        bad.append(("garbage-base64", "POST", "/sdapi/v1/img2img",
                    {"prompt": "x", "init_images": [random.choice(["%%%%", "aGVsbG8gd29ybGQ=", "@" * 100])]}))
    for i in range(4):
        bad.append(("body-too-large", "POST", "/sdapi/v1/img2img",
                    b'{"prompt":"x","init_images":["' + b"A" * (17 * 1024 * 1024) + b'"]}'))
    for p in ["/api/images/..%2F..%2Fensueno.db", "/api/jobs/..%2F..%2Fetc%2Fpasswd",
              "/api/images/..%2Fensueno.png", "/api/jobs/%2e%2e%2fensueno.db"]:
        bad.append(("path-traversal", "GET", p, None))
    return valid, bad


def run_one(base, item, stats):
    kind, method, path, body = item
    raw = body if isinstance(body, bytes) else None
    jbody = None if raw is not None else body
    t0 = time.time()
    retries = 0
    while True:
        try:
            status, headers, reply = call(method, base + path, jbody, raw)
        except OSError as e:
            # A failure of this test, reported rather than raised.
            return kind, 0, {"detail": f"connection error: {e}"}, time.time() - t0, retries
        if status == 429:
            retries += 1
            with stats["lock"]:
                stats["429"] += 1
            time.sleep(float(headers.get("Retry-After", "1")))
            continue
        break
    if kind == "api" and status == 202:
        job = reply["id"]
        while True:
            s, _, j = call("GET", f"{base}/api/jobs/{job}")
            if j.get("status") in ("done", "failed", "cancelled"):
                status = 200 if j["status"] == "done" else 500
                reply = j
                break
            time.sleep(0.25)
    return kind, status, reply, time.time() - t0, retries


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the 200-request burst against the same server (RSS over time)")
    ap.add_argument("--json")
    args = ap.parse_args()
    random.seed(0)
    data = tempfile.mkdtemp(prefix="ensueno-load-")
    proc, base = start_server(data, "--max-queue", str(args.max_queue))
    rss = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            v = rss_kib(proc.pid)
            if v:
                rss.append(v)
            time.sleep(0.05)

    rss_before = rss_kib(proc.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    valid, bad = requests_list()
    stats = {"lock": threading.Lock(), "429": 0}
    results = []
    rss_per_round = []
    t0 = time.time()
    for _ in range(args.rounds):
        items = [(True, x) for x in valid] + [(False, x) for x in bad]
        random.shuffle(items)
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            futures = [(ok, pool.submit(run_one, base, x, stats)) for ok, x in items]
            results += [(ok, f.result()) for ok, f in futures]
        rss_per_round.append(round(rss_kib(proc.pid) / 1024, 1))
    wall = time.time() - t0
    stop.set()
    sampler.join()
    rss_after = rss_kib(proc.pid)
    proc.terminate()
    proc.wait()

    failures = []
    valid_ok = 0
    latencies = []
    bad_ok = 0
    by_kind = {}
    for ok, (kind, status, reply, dt, _) in results:
        if ok:
            good = status in (200, 202) and (kind == "api" or len(reply.get("images", [])) == 1)
            valid_ok += good
            latencies.append(dt)
            if not good:
                failures.append((kind, status, str(reply)[:200]))
        else:
            detail = reply.get("detail") if isinstance(reply, dict) else None
            good = 400 <= status < 500 and status != 429 and bool(detail)
            bad_ok += good
            by_kind.setdefault(kind, set()).add(status)
            if not good:
                failures.append((kind, status, str(reply)[:200]))
    latencies.sort()
    summary = {
        "rounds": args.rounds,
        "requests": len(results),
        "valid": len(valid) * args.rounds, "valid_completed": valid_ok,
        "malformed": len(bad) * args.rounds, "malformed_4xx_with_message": bad_ok,
        "malformed_statuses": {k: sorted(v) for k, v in by_kind.items()},
        "queue_full_429_then_retried": stats["429"],
        "max_queue": args.max_queue,
        "wall_s": round(wall, 1),
        "valid_latency_s": {"p50": round(latencies[len(latencies) // 2], 2),
                            "p95": round(latencies[int(len(latencies) * 0.95)], 2),
                            "max": round(latencies[-1], 2)},
        "rss_mib": {"before": round(rss_before / 1024, 1), "peak": round(max(rss) / 1024, 1),
                    "after": round(rss_after / 1024, 1) if rss_after else None,
                    "after_each_round": rss_per_round},
        "failures": failures[:10],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    ok = valid_ok == len(valid) * args.rounds and bad_ok == len(bad) * args.rounds
    print("PASS" if ok else "FAIL", "load test")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

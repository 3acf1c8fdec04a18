"""Crash test of the persistent queue: with one job running and 20 queued,
`kill -9` the server, start it again on the same data folder, and check
that all of them complete (the running one is re-run from the start, with
the seed it was given when accepted).

Usage (from the repository root, after `cargo build -p ensueno-cli`):
    /root/venvs/ensueno/bin/python scripts/server/kill9_test.py [--json OUT]
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time

from common import call, start_server


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queued", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    data = tempfile.mkdtemp(prefix="ensueno-kill9-")
    proc, base = start_server(data)
    # A long job keeps the worker busy, so the others are still queued at the kill.
    s, _, first = call("POST", base + "/api/jobs",
                       {"prompt": "the running one", "steps": 40, "width": 128, "height": 128, "seed": 1})
    assert s == 202, first
    ids = [first["id"]]
    for i in range(args.queued):
        s, _, r = call("POST", base + "/api/jobs", {"prompt": f"queued {i}", "steps": 4, "seed": 100 + i})
        assert s == 202, r
        ids.append(r["id"])
    while call("GET", f"{base}/api/jobs/{ids[0]}")[2]["status"] != "running":
        time.sleep(0.05)
    before = [call("GET", f"{base}/api/jobs/{i}")[2]["status"] for i in ids]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    counts = {k: before.count(k) for k in set(before)}
    print("at the kill -9:", counts)

    t0 = time.time()
    proc, base = start_server(data, port=None)
    final = {}
    while len(final) < len(ids):
        for i in ids:
            if i in final:
                continue
            s, _, j = call("GET", f"{base}/api/jobs/{i}")
            if j.get("status") in ("done", "failed", "cancelled"):
                final[i] = j
        if time.time() - t0 > 600:
            break
        time.sleep(0.2)
    took = time.time() - t0
    proc.terminate()
    proc.wait()
    done = sum(1 for j in final.values() if j["status"] == "done")
    seeds_kept = all(final[i]["seeds"] == [100 + n] for n, i in enumerate(ids[1:]) if i in final)
    summary = {"at_kill": counts, "jobs": len(ids), "done_after_restart": done,
               "queued_at_kill_done": sum(1 for i, b in zip(ids, before) if b == "queued" and final.get(i, {}).get("status") == "done"),
               "queued_at_kill": before.count("queued"),
               "seeds_kept": seeds_kept, "restart_to_all_done_s": round(took, 1)}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    ok = done == len(ids) and seeds_kept
    print("PASS" if ok else "FAIL", f"kill -9 test: {done}/{len(ids)} done after restart")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

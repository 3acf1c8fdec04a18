#!/usr/bin/env bash
# One training step (forward, backward, AdamW) of the text-to-image UNet of
# configs/text2image-emoji.json on random 8x8 latents and 32-token contexts,
# ensueno (examples/t2i_step.rs) against diffusers' UNet2DConditionModel +
# torch.optim.AdamW, same machine, same threads, back to back. Median of the
# steps after the first.
#   usage: scripts/bench_t2i_step.sh   (BATCH default 64, THREADS default nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
BATCH="${BATCH:-64}"
THREADS="${THREADS:-$(nproc)}"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
CONFIG=configs/text2image-emoji.json
cargo build -q --release -p ensueno --example t2i_step
ours=$(target/release/examples/t2i_step "$CONFIG" "$BATCH" | awk '/^step [1-9]/ {
    gsub(",", ""); print $4 + $7 + $10 }' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
theirs=$("$PY" - "$CONFIG" "$BATCH" "$THREADS" <<'PYEOF'
import json, sys, time, statistics
import torch
from diffusers import UNet2DConditionModel
config, batch, threads = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
unet = UNet2DConditionModel(**config["unet"])
opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
x = torch.randn(batch, 4, 8, 8)
ctx = torch.randn(batch, config["recipe"]["max_text_tokens"], 384)
t = torch.full((batch,), 500.0)
times = []
for i in range(5):
    s = time.perf_counter()
    loss = unet(x, t, ctx).sample.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - s)
print(statistics.median(times[1:]))
PYEOF
)
awk -v a="$ours" -v b="$theirs" -v bs="$BATCH" 'BEGIN {
    printf "RATIO train_step_text2image %.2f   (ensueno %.3f s/step, torch %.3f s/step, batch %d)\n", a / b, a, b, bs }'

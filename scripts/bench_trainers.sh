#!/usr/bin/env bash
# Time per training step of each trainer against its PyTorch twin, same
# machine, same threads, back to back in one run (issue "Training from
# scratch": time per epoch as a ratio). Each side trains STEPS steps of one
# epoch on the real data (the first step, which warms caches, is included on
# both sides); seconds per epoch = seconds per step x steps per epoch.
#   usage: scripts/bench_trainers.sh [vae] [gan] [diffusion]
#   DATA (default ../shared/data/mnist), STEPS (default 30), THREADS (default nproc),
#   ENSUENO_VENV: an existing venv with torch and diffusers (else scripts/python_env.sh makes one)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
DATA="${DATA:-../shared/data/mnist}"
STEPS="${STEPS:-30}"
THREADS="${THREADS:-$(nproc)}"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
KINDS=("$@")
[ ${#KINDS[@]} -eq 0 ] && KINDS=(vae gan diffusion)
cargo build -q --release -p ensueno-cli
BIN=target/release/ensueno
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Batch sizes of the recipes: VAE 128 (Keras), GAN 64, diffusion 128.
declare -A BATCH=([vae]=128 [gan]=64 [diffusion]=128)
for kind in "${KINDS[@]}"; do
    b="${BATCH[$kind]}"
    "$BIN" train "$kind" --data "$DATA" -o "$WORK/$kind" --epochs 1 --batch-size "$b" \
        --max-steps-per-epoch "$STEPS" >/dev/null 2>&1
    ours=$("$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['epoch_seconds'][0] / len(s['history']))" \
        "$WORK/$kind/checkpoints/epoch-0001/training_state.json")
    theirs=$("$PY" "scripts/twins/$kind.py" --data "$DATA" --epochs 1 --batch-size "$b" \
        --threads "$THREADS" --max-steps-per-epoch "$STEPS" |
        "$PY" -c "import json,sys
for line in sys.stdin:
    d = json.loads(line)
    if 'seconds' in d: print(d['seconds'] / d['steps'])")
    awk -v k="$kind" -v a="$ours" -v b="$theirs" -v bs="$b" 'BEGIN {
        printf "RATIO train_%s %.2f   (ensueno %.3f s/step, torch %.3f s/step, batch %d)\n", k, a / b, a, b, bs }'
done

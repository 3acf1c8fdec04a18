#!/usr/bin/env bash
# ensueno (candle) vs PyTorch/diffusers on the CPU figures of the "CPU speed"
# issue: crates/ensueno/benches/cpu.rs and scripts/bench/torch_twin.py run
# back to back on the same machine with the same thread count, then prints
# RATIO <figure> <ensueno time / torch time> per figure (< 1: ensueno faster).
#   usage: scripts/bench_vs_torch.sh [FILTER...]   (e.g. train_step sample_step conv2d)
#   THREADS (default: nproc); ENSUENO_VENV: an existing venv with torch and
#   diffusers (e.g. /root/venvs/ensueno), else scripts/python_env.sh builds one
# The heavy figures (latent_unet_step, sd15_unet_step, vae_decode_512) take
# minutes with candle's current kernels: skip them with a filter.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
THREADS="${THREADS:-$(nproc)}"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
RUST_OUT="$(mktemp)"
TORCH_OUT="$(mktemp)"
trap 'rm -f "$RUST_OUT" "$TORCH_OUT"' EXIT

cargo bench -q -p ensueno --bench cpu --no-run
echo "# ensueno (candle), $THREADS threads"
cargo bench -q -p ensueno --bench cpu -- "$@" | tee "$RUST_OUT"
echo "# torch $("$PY" -c 'import torch; print(torch.__version__)'), $THREADS threads"
"$PY" scripts/bench/torch_twin.py "$THREADS" "$@" | tee "$TORCH_OUT"

echo "# ratios (ensueno / torch)"
awk '
    FNR == NR && $1 == "TIME" { rust[$2] = $3; order[++n] = $2; next }
    $1 == "TIME" { torch[$2] = $3 }
    END {
        for (i = 1; i <= n; i++) {
            k = order[i]
            if (k in torch && torch[k] > 0)
                printf "RATIO %s %.2f   (ensueno %.4f s, torch %.4f s)\n", k, rust[k] / torch[k], rust[k], torch[k]
        }
    }
' "$RUST_OUT" "$TORCH_OUT"

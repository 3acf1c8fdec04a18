#!/usr/bin/env bash
# ensueno (candle) vs PyTorch/diffusers on the CPU figures of the "CPU speed"
# issue: crates/ensueno/benches/cpu.rs and scripts/bench/torch_twin.py run
# back to back on the same machine with the same thread count, then prints
# RATIO <figure> <ensueno time / torch time> per figure (< 1: ensueno faster).
#   usage: [ROUNDS=N] scripts/bench_vs_torch.sh [FILTER...]   (e.g. train_step sample_step conv2d)
#   THREADS (default: nproc); ENSUENO_VENV: an existing venv with torch and
#   diffusers (e.g. /root/venvs/ensueno), else scripts/python_env.sh builds one
# The heavy figures (latent_unet_step, sd15_unet_step, vae_decode_512) take
# minutes with candle's current kernels: skip them with a filter.
#   ENSUENO_BENCH_DEVICE=cuda: both sides run on the GPU (the Rust side must
#   be built with --features cuda). ENSUENO_BENCH_BIN: a prebuilt bench
#   binary to run instead of `cargo bench` (for a GPU machine without a Rust
#   toolchain: `cargo bench -p ensueno --features cuda --bench cpu --no-run`
#   prints its path).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
THREADS="${THREADS:-$(nproc)}"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
RUST_OUT="$(mktemp)"
TORCH_OUT="$(mktemp)"
trap 'rm -f "$RUST_OUT" "$TORCH_OUT"' EXIT

if [ -n "${ENSUENO_BENCH_BIN:-}" ]; then
    run_rust() { "$ENSUENO_BENCH_BIN" "$@"; }
else
    cargo bench -q -p ensueno --bench cpu --no-run
    run_rust() { cargo bench -q -p ensueno --bench cpu -- "$@"; }
fi
# ROUNDS > 1 alternates the two sides ROUNDS times and reports, per figure,
# the median of the per-round ratios (and their range): on a machine whose
# speed drifts from minute to minute, each ratio then compares runs taken
# seconds apart.
ROUNDS="${ROUNDS:-1}"
RATIOS="$(mktemp)"
trap 'rm -f "$RUST_OUT" "$TORCH_OUT" "$RATIOS"' EXIT
for round in $(seq 1 "$ROUNDS"); do
    [ "$ROUNDS" -gt 1 ] && echo "# round $round of $ROUNDS"
    echo "# ensueno (candle), $THREADS threads"
    run_rust "$@" | tee "$RUST_OUT"
    echo "# torch $("$PY" -c 'import torch; print(torch.__version__)'), $THREADS threads"
    "$PY" scripts/bench/torch_twin.py "$THREADS" "$@" | tee "$TORCH_OUT"
    awk -v round="$round" '
        FNR == NR && $1 == "TIME" { rust[$2] = $3; order[++n] = $2; next }
        $1 == "TIME" { torch[$2] = $3 }
        END {
            for (i = 1; i <= n; i++) {
                k = order[i]
                if (k in torch && torch[k] > 0)
                    printf "%s %s %.6f %.6f\n", round, k, rust[k], torch[k]
            }
        }
    ' "$RUST_OUT" "$TORCH_OUT" >> "$RATIOS"
done

echo "# ratios (ensueno / torch)"
if [ "$ROUNDS" -eq 1 ]; then
    awk '{ printf "RATIO %s %.2f   (ensueno %.4f s, torch %.4f s)\n", $2, $3 / $4, $3, $4 }' "$RATIOS"
else
    # Per figure: median ratio over the rounds, its range, and the median
    # times of each side.
    "$PY" - "$RATIOS" <<'PYEOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    _, name, rust, torch = line.split()
    rows.setdefault(name, []).append((float(rust), float(torch)))
for name, pairs in rows.items():
    ratios = sorted(r / t for r, t in pairs)
    print(f"RATIO {name} {statistics.median(ratios):.2f}   (range {ratios[0]:.2f} - {ratios[-1]:.2f} over {len(pairs)} rounds; "
          f"ensueno median {statistics.median(r for r, _ in pairs):.4f} s, torch median {statistics.median(t for _, t in pairs):.4f} s)")
PYEOF
fi

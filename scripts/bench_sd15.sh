#!/usr/bin/env bash
# SD 1.5-shaped one-step benchmark: ensueno vs diffusers on the same random
# weights (generated at run time, never committed), same machine, same
# thread count, back to back. Prints RATIO lines (ensueno / diffusers).
#   THREADS  (default: nproc)   MODEL_DIR (default: /tmp/ensueno-sd15-random)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
THREADS="${THREADS:-$(nproc)}"
MODEL_DIR="${MODEL_DIR:-/tmp/ensueno-sd15-random}"
[ -f "$MODEL_DIR/model_index.json" ] || "$PY" scripts/bench/sd15_random.py "$MODEL_DIR"
cargo build --release -q -p ensueno --example sd15_step
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS"
echo "# diffusers (torch $("$PY" -c 'import torch; print(torch.__version__)'), $THREADS threads)"
"$PY" scripts/bench/sd15_step_torch.py "$MODEL_DIR" "$THREADS" 2>/dev/null | tee /tmp/ensueno-bench-torch.txt
echo "# ensueno ($THREADS threads)"
"${CARGO_TARGET_DIR:-target}"/release/examples/sd15_step "$MODEL_DIR" | tee /tmp/ensueno-bench-rust.txt
for name in unet_step_cfg generate_1_step; do
    r=$(grep "TIME $name " /tmp/ensueno-bench-rust.txt | awk '{print $3}')
    t=$(grep "TIME $name " /tmp/ensueno-bench-torch.txt | awk '{print $3}')
    echo "RATIO $name $(python3 -c "print(f'{$r/$t:.2f}')")"
done
r=$(grep PEAK_RSS_MB /tmp/ensueno-bench-rust.txt | awk '{print $2}')
t=$(grep PEAK_RSS_MB /tmp/ensueno-bench-torch.txt | awk '{print $2}')
echo "RATIO peak_rss $(python3 -c "print(f'{$r/$t:.2f}')")"

#!/usr/bin/env bash
# ensueno's own text-to-image model: one 64x64 image in 20 DPM++ 2M steps
# with classifier-free guidance, end to end as a person runs it (process
# start, model load, text encoding, denoising, decoding, PNG written),
# against diffusers' StableDiffusionPipeline on the same folder, same
# threads, back to back in one run. Best of RUNS on each side.
#   usage: scripts/bench_text2image.sh
#   MODEL (default models/emoji-text2image), RUNS (default 5), THREADS (default nproc),
#   ENSUENO_VENV: an existing venv with torch and diffusers (else scripts/python_env.sh makes one)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
MODEL="${MODEL:-models/emoji-text2image}"
RUNS="${RUNS:-5}"
THREADS="${THREADS:-$(nproc)}"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
cargo build -q --release -p ensueno-cli
BIN=target/release/ensueno
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

best=999
for i in $(seq "$RUNS"); do
    s=$(date +%s.%N)
    "$BIN" generate "an elephant" --model "$MODEL" --steps 20 --seed "$i" --output "$WORK/e.png" 2>/dev/null
    e=$(date +%s.%N)
    best=$(awk -v a="$best" -v b="$(echo "$e - $s" | bc)" 'BEGIN { print (b < a) ? b : a }')
done

theirs=$("$PY" - "$MODEL" "$RUNS" "$THREADS" "$WORK" <<'PYEOF'
import json, os, sys, time
t0 = time.time()
import torch
from diffusers import StableDiffusionPipeline
import_s = time.time() - t0
model, runs, threads, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
prompting = os.path.join(model, "prompting.json")
sentence_token = os.path.exists(prompting) and json.load(open(prompting)).get("sentence_token", False)
best = 1e9
for i in range(runs):
    s = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    text = dict(prompt="an elephant")
    if sentence_token:
        # The same conditioning as ensueno's: the mean token state appended.
        def embeds(t):
            tok = pipe.tokenizer([t], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
            with torch.no_grad():
                hidden = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
            mask = tok.attention_mask.unsqueeze(-1).to(hidden.dtype)
            return torch.cat([hidden, ((hidden * mask).sum(1) / mask.sum(1)).unsqueeze(1)], 1)
        text = dict(prompt_embeds=embeds("an elephant"), negative_prompt_embeds=embeds(""))
    image = pipe(**text, num_inference_steps=20, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(i)).images[0]
    image.save(f"{work}/d.png")
    best = min(best, time.time() - s)
# Python's imports are paid once per process, as our process start is.
print(best + import_s)
PYEOF
)
awk -v a="$best" -v b="$theirs" 'BEGIN {
    printf "RATIO generate_64px_20steps %.2f   (ensueno %.2f s, diffusers %.2f s incl. its imports; end to end, best of runs)\n", a / b, a, b }'

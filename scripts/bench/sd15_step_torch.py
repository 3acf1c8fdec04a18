"""diffusers' side of the SD 1.5 one-step benchmark.

Loads the random-weight folder written by sd15_random.py and times what
`ensueno generate --steps 1` does: a 512x512 txt2img with classifier-free
guidance (UNet at batch 2), one DDIM step, VAE decode. Prints
`TIME <name> <seconds>` lines and the process's peak RSS.

    python scripts/bench/sd15_step_torch.py MODEL_DIR THREADS [f32|f16]
"""

import sys
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def main(model, threads, dtype):
    torch.set_num_threads(int(threads))
    dt = {"f32": torch.float32, "f16": torch.float16}[dtype]
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dt, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    print(f"TIME load {time.perf_counter() - t0:.3f}", flush=True)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 64, 64), generator=g).to(dt)
    with torch.no_grad():
        emb = pipe.encode_prompt("a red apple on a tree", "cpu", 1, True, "")
        ctx = torch.cat([emb[1], emb[0]])
        x = torch.cat([latents, latents])
        t = torch.tensor(981)
        pipe.unet(x, t, encoder_hidden_states=ctx)  # warm-up
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            pipe.unet(x, t, encoder_hidden_states=ctx)
            times.append(time.perf_counter() - t0)
        print(f"TIME unet_step_cfg {min(times):.3f}", flush=True)
        t0 = time.perf_counter()
        pipe("a red apple on a tree", num_inference_steps=1, guidance_scale=7.5, latents=latents, output_type="np")
        print(f"TIME generate_1_step {time.perf_counter() - t0:.3f}", flush=True)
    import resource

    print(f"PEAK_RSS_MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "f32")

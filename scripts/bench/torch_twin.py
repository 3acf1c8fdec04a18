"""PyTorch / diffusers twin of crates/ensueno/benches/cpu.rs.

Same figures, models, shapes and timing method (one warm-up run of duration t,
then N = clamp(floor(4 s / t), 1, 10) timed runs, median; the heavy figures run
once without warm-up). Prints `TIME <name> <median seconds>` lines.

Usage: python scripts/bench/torch_twin.py THREADS [FILTER...]
A figure runs when its name contains one of the filters (all without).
Weights are diffusers' default random initialisations.

ENSUENO_BENCH_DEVICE=cuda runs every figure on the GPU (as the Rust side does
with the same variable): each timed call ends with torch.cuda.synchronize(),
the heavy figures get a warm-up too, and `sd15_unet_step_f16` (the SD 1.5 UNet
with f16 weights and activations) is added. TF32 stays off, as in candle.
"""

import math
import sys
import time

import os

import torch
import torch.nn.functional as F

BUDGET_S = 4.0
MAX_RUNS = 10
DEVICE = torch.device(os.environ.get("ENSUENO_BENCH_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"


def figure(name, heavy, f):
    if CUDA:
        # Kernels run asynchronously: time until the GPU is done, and warm
        # up even the heavy figures (they take milliseconds there).
        body = f

        def f():
            body()
            torch.cuda.synchronize()

        heavy = False
    if heavy:
        runs = 1
    else:
        start = time.perf_counter()
        f()
        t = time.perf_counter() - start
        runs = min(max(math.floor(BUDGET_S / t), 1), MAX_RUNS)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    times.sort()
    if runs % 2 == 1:
        median = times[runs // 2]
    else:
        median = 0.5 * (times[runs // 2 - 1] + times[runs // 2])
    print(f"TIME {name} {median:.6f}", flush=True)
    print(f"# {name}: {runs} runs, min {times[0]:.4f} s", file=sys.stderr)


def ddpm_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=10,
    )


def latent_unet():
    # Same as latent_unet_config() in benches/cpu.rs.
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=384,
        attention_head_dim=8,
    )


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )


def params(model):
    return sum(p.numel() for p in model.parameters())


def main():
    threads = int(sys.argv[1])
    filters = sys.argv[2:]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def wanted(name):
        return not filters or any(f in name for f in filters)

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {DEVICE}", file=sys.stderr)

    if wanted("train_step") or wanted("sample_step"):
        b = 64
        x = torch.randn(b, 1, 28, 28, device=DEVICE)
        noise = torch.randn(b, 1, 28, 28, device=DEVICE)
        t = torch.randint(0, 1000, (b,), device=DEVICE)
        labels = torch.randint(0, 10, (b,), device=DEVICE)
        if wanted("train_step"):
            model = ddpm_unet().to(DEVICE).train()
            print(f"PARAMS unet_2d_ddpm {params(model)}")
            opt = torch.optim.AdamW(model.parameters())

            def train():
                opt.zero_grad(set_to_none=True)
                pred = model(x, t, class_labels=labels).sample
                F.mse_loss(pred, noise).backward()
                opt.step()

            figure("train_step", False, train)
        if wanted("sample_step"):
            model = ddpm_unet().to(DEVICE).eval()

            def sample():
                with torch.no_grad():
                    model(x, t, class_labels=labels)

            figure("sample_step", False, sample)

    with torch.no_grad():
        if wanted("conv2d"):
            x = torch.randn(16, 64, 64, 64, device=DEVICE)
            w = torch.randn(64, 64, 3, 3, device=DEVICE) * 0.05
            figure("conv2d", False, lambda: F.conv2d(x, w, padding=1))
        if wanted("conv_transpose2d"):
            x = torch.randn(16, 64, 32, 32, device=DEVICE)
            w = torch.randn(64, 32, 4, 4, device=DEVICE) * 0.05
            figure("conv_transpose2d", False, lambda: F.conv_transpose2d(x, w, stride=2, padding=1))
        if wanted("group_norm"):
            x = torch.randn(64, 32, 28, 28, device=DEVICE)
            norm = torch.nn.GroupNorm(8, 32, eps=1e-5).to(DEVICE)
            figure("group_norm", False, lambda: F.silu(norm(x)))
        if wanted("attention"):
            q, k, v = (torch.randn(16, 4096, 40, device=DEVICE) for _ in range(3))
            figure("attention", False, lambda: F.scaled_dot_product_attention(q, k, v))

        if wanted("latent_unet_step"):
            model = latent_unet().to(DEVICE).eval()
            print(f"PARAMS latent_unet {params(model)}")
            x = torch.randn(8, 4, 64, 64, device=DEVICE)
            ctx = torch.randn(8, 77, 384, device=DEVICE)
            figure("latent_unet_step", True, lambda: model(x, 500, ctx))
        if wanted("sd15_unet_step"):
            model = sd15_unet().to(DEVICE).eval()
            print(f"PARAMS sd15_unet {params(model)}")
            x = torch.randn(2, 4, 64, 64, device=DEVICE)
            ctx = torch.randn(2, 77, 768, device=DEVICE)
            figure("sd15_unet_step", True, lambda: model(x, 500, ctx))
            if CUDA:
                half = model.half()
                xh, ch = x.half(), ctx.half()
                figure("sd15_unet_step_f16", True, lambda: half(xh, 500, ch))
        if wanted("vae_decode_512"):
            vae = sd15_vae().to(DEVICE).eval()
            z = torch.randn(1, 4, 64, 64, device=DEVICE)
            figure("vae_decode_512", True, lambda: vae.decode(z))


if __name__ == "__main__":
    main()

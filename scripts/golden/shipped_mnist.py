"""Proves that diffusers (and the PyTorch twin of the VAE) load
ensueno's shipped MNIST models and records what they compute, for
crates/ensueno/tests/shipped_models.rs.

The diffusion model: diffusers loads models/mnist-diffusion with diffusers' own `DDPMPipeline.from_pretrained`
(UNet2DModel + DDPMScheduler from our config files and safetensors), runs the
UNet on seeded inputs (noisy digits, timesteps, class labels incl. the null
class), and runs a whole DDIM sampling loop with classifier-free guidance from
a seeded initial noise. Writes inputs and outputs to
crates/ensueno/tests/fixtures/shipped/mnist_diffusion.safetensors.

Run from the repository root: $PY scripts/golden/shipped_mnist.py
"""

import json
import os

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMPipeline
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "mnist-diffusion")
OUT = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures", "shipped")


def main():
    torch.manual_seed(0)
    pipe = DDPMPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    unet = pipe.unet.eval()
    sampling = json.load(open(os.path.join(MODEL, "sampling.json")))
    null = sampling["null_class"]

    # One UNet evaluation on seeded inputs.
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([999.0, 500.0, 20.0, 0.0])
    labels = torch.tensor([7, 3, null, 0])
    with torch.no_grad():
        eps = unet(x, t, class_labels=labels).sample

    # A whole DDIM loop with guidance, as ensueno's PixelDiffusionPipeline.
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    steps, scale = 10, sampling["guidance_scale"]
    sched.set_timesteps(steps)
    classes = torch.tensor([0, 1, 7, 9])
    noise = torch.randn(4, 1, 28, 28)
    sample = noise * sched.init_noise_sigma
    with torch.no_grad():
        for step_t in sched.timesteps:
            inp = torch.cat([sample, sample])
            lab = torch.cat([classes, torch.full_like(classes, null)])
            out = unet(inp, step_t, class_labels=lab).sample
            cond, uncond = out.chunk(2)
            guided = uncond + scale * (cond - uncond)
            sample = sched.step(guided, step_t, sample).prev_sample
    images = (sample.clamp(-1, 1) + 1) / 2

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "mnist_diffusion.safetensors")
    save_file(
        {
            "x": x.contiguous(),
            "t": t.contiguous(),
            "labels": labels.to(torch.int64).contiguous(),
            "eps": eps.contiguous(),
            "classes": classes.to(torch.int64).contiguous(),
            "noise": noise.contiguous(),
            "images": images.contiguous(),
        },
        path,
        metadata={
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "steps": str(steps),
            "guidance_scale": str(scale),
            "scheduler": "DDIMScheduler.from_config(DDPMScheduler config)",
        },
    )
    print(f"diffusers {diffusers.__version__} loaded {MODEL}: wrote {path}")

    # The VAE: the PyTorch twin's module tree loads our safetensors strictly.
    import sys

    sys.path.insert(0, os.path.join(ROOT, "scripts", "twins"))
    from safetensors.torch import load_file
    from vae import ConvVAE

    vae_dir = os.path.join(ROOT, "models", "mnist-vae")
    config = json.load(open(os.path.join(vae_dir, "config.json")))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = ConvVAE(**config).eval()
    state = {k: v.float() for k, v in load_file(os.path.join(vae_dir, "model.safetensors")).items()}
    vae.load_state_dict(state, strict=True)
    z = torch.randn(6, config.get("latent_dim", 2))
    test = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        decoded = torch.sigmoid(vae.decoder(z))
        z_mean, z_log_var = vae.encoder(test)
    path = os.path.join(OUT, "mnist_vae.safetensors")
    save_file(
        {"z": z, "decoded": decoded, "x": test, "z_mean": z_mean, "z_log_var": z_log_var},
        path,
        metadata={"torch": torch.__version__, "reference": "scripts/twins/vae.py ConvVAE"},
    )
    print(f"the PyTorch twin loaded {vae_dir}: wrote {path}")


if __name__ == "__main__":
    main()

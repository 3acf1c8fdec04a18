"""Golden fixtures for ensueno's UNet2DModel (the DDPM pixel-space UNet,
diffusers 0.42 reference).

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/unet_2d.py

Writes tiny seeded random-weight UNet2DModels (diffusers `save_pretrained`
layout: config.json + diffusion_pytorch_model.safetensors) and their
inputs/outputs (case.safetensors) into
crates/ensueno/tests/fixtures/unet_2d/<case>/. Every parameter, including the
zero-initialised ones, is re-initialised with seeded noise (norm weights
1 +- 0.1, biases ~0.1, other weights ~1/sqrt(fan_in)).
"""
import json
import math
import os

import diffusers
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

ROOT = os.path.join("crates", "ensueno", "tests", "fixtures", "unet_2d")


def reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            module = name.split(".")[-2]
            if "norm" in module:
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "class_embedding" in name and p.dim() == 2 and "linear" not in name:
                p.copy_(noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(noise / math.sqrt(fan_in))


CASES = {
    # Class-conditional (embedding table), every supported block type, the
    # mid block with multi-head attention and group norm.
    "class": dict(
        config=dict(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=4,
            norm_num_groups=4,
            num_class_embeds=5,
        ),
        batch=2,
        labels="table",
    ),
    # Non-default settings: scale-shift time embedding (mid attention without
    # group norm), one head per block, "timestep" class embedding, centred
    # input, freq shift, no sin/cos flip, mid-block scale factor, gelu, eps.
    "variant": dict(
        config=dict(
            sample_size=8,
            in_channels=2,
            out_channels=1,
            center_input_sample=True,
            flip_sin_to_cos=False,
            freq_shift=1,
            down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
            block_out_channels=(4, 8, 8),
            layers_per_block=2,
            attention_head_dim=None,
            norm_num_groups=4,
            norm_eps=1e-6,
            act_fn="gelu",
            mid_block_scale_factor=1.5,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="timestep",
        ),
        batch=3,
        labels="timestep",
    ),
}


def main():
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    for i, (name, case) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        model = UNet2DModel(**case["config"]).eval()
        reinit(model, seed=1000 + i)
        cfg = model.config
        b = case["batch"]
        sample = torch.randn(b, cfg.in_channels, 8, 8)
        timesteps = torch.tensor([981.0, 17.0, 500.0][:b])
        if case["labels"] == "table":
            labels = torch.tensor([3, 0, 4][:b], dtype=torch.int64)
        else:
            labels = torch.tensor([12.0, 700.0, 3.5][:b])
        with torch.no_grad():
            out = model(sample, timesteps, class_labels=labels).sample
        out_dir = os.path.join(ROOT, name)
        model.save_pretrained(out_dir, safe_serialization=True)
        tensors = {
            "sample": sample.contiguous(),
            "timesteps": timesteps.contiguous(),
            "class_labels": (labels.to(torch.int64) if case["labels"] == "table" else labels).contiguous(),
            "output": out.contiguous(),
        }
        save_file(tensors, os.path.join(out_dir, "case.safetensors"), metadata=versions)
        with open(os.path.join(out_dir, "reference.json"), "w") as f:
            json.dump(versions, f, indent=2)
        n = sum(p.numel() for p in model.parameters())
        print(f"wrote {out_dir}: {n} params, output {tuple(out.shape)}, max|out| {out.abs().max():.4f}")


if __name__ == "__main__":
    main()

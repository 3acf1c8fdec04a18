"""Golden fixtures for ensueno's AutoencoderKL (diffusers 0.42 reference).

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/vae.py

Writes tiny seeded random-weight VAEs (diffusers `save_pretrained` layout)
and encode/decode inputs and outputs into
crates/ensueno/tests/fixtures/vae/<case>/. Every parameter is re-initialised
with seeded noise (norm weights 1 +- 0.1, biases ~0.1, other weights
~1/sqrt(fan_in)) so that no layer is an exact zero or identity.
"""
import json
import math
import os

import diffusers
import safetensors
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.join("crates", "ensueno", "tests", "fixtures", "vae")


def reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name.split(".")[-2]:
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(noise / math.sqrt(fan_in))


CONFIGS = {
    "two_blocks": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 24),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=32,
    ),
    # Three blocks, two resnets per block, no post-quant conv, other scaling.
    "three_blocks": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=3,
        sample_size=16,
        scaling_factor=0.13025,
        shift_factor=0.0609,
        use_post_quant_conv=False,
    ),
}

# name -> (config, image shape)
CASES = {
    "two_blocks": ("two_blocks", (1, 3, 32, 32)),
    "three_blocks": ("three_blocks", (2, 3, 16, 24)),
}


def main():
    for i, (case, (cfg_name, shape)) in enumerate(CASES.items()):
        cfg = CONFIGS[cfg_name]
        model = AutoencoderKL(**cfg).eval()
        reinit(model, 3000 + i)
        model.save_pretrained(os.path.join(ROOT, cfg_name), safe_serialization=True)
        g = torch.Generator().manual_seed(4000 + i)
        image = torch.rand(shape, generator=g) * 2 - 1
        factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        latent_shape = (shape[0], cfg["latent_channels"], shape[2] // factor, shape[3] // factor)
        latent = torch.randn(latent_shape, generator=g)
        with torch.no_grad():
            dist = model.encode(image).latent_dist
            decoded = model.decode(latent).sample
        path = os.path.join(ROOT, f"case_{case}.safetensors")
        save_file(
            {
                "image": image.contiguous(),
                "mean": dist.mean.contiguous(),
                "std": dist.std.contiguous(),
                "latent": latent.contiguous(),
                "decoded": decoded.contiguous(),
            },
            path,
            metadata={"model": cfg_name},
        )
        print(
            "wrote", path, "params", sum(p.numel() for p in model.parameters()),
            "mean", tuple(dist.mean.shape), "decoded", tuple(decoded.shape),
        )
    with open(os.path.join(ROOT, "reference.json"), "w") as f:
        json.dump(
            {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "safetensors": safetensors.__version__,
                "script": "scripts/golden/vae.py",
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()

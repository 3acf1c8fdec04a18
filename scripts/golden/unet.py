"""Golden fixtures for ensueno's UNet2DConditionModel (diffusers 0.42 reference).

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/unet.py

Writes tiny seeded random-weight UNets (diffusers `save_pretrained` layout) and
their inputs/outputs into crates/ensueno/tests/fixtures/unet/<case>/.
Every parameter is re-initialised with seeded noise (norm weights 1 +- 0.1,
biases ~0.1, other weights ~1/sqrt(fan_in)) so that no part of the network is
an exact zero or identity and a wrong implementation cannot hide.
"""
import json
import math
import os

import diffusers
import safetensors
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.join("crates", "ensueno", "tests", "fixtures", "unet")


def reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name.split(".")[-2] or name.split(".")[-2].startswith("norm"):
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(noise / math.sqrt(fan_in))


# SD 1.x-like: conv proj_in/proj_out, one int attention_head_dim (the heads quirk).
SD1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=False,
)

CONFIGS = {
    "sd1": SD1,
    # SD 2.x-like: per-block attention_head_dim, linear projections, three
    # blocks, and non-default settings everywhere they are cheap to exercise.
    "sd2": dict(
        sample_size=8,
        in_channels=4,
        out_channels=3,
        center_input_sample=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 24, 24),
        layers_per_block=(1, 2, 1),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=24,
        transformer_layers_per_block=(2, 1, 1),
        norm_num_groups=8,
        norm_eps=1e-6,
        act_fn="gelu",
        use_linear_projection=True,
        upcast_attention=True,
        mid_block_scale_factor=1.5,
        resnet_time_scale_shift="scale_shift",
        downsample_padding=1,
    ),
    # Stable unCLIP's class embedding: a vector per sample, projected and
    # added to the time embedding. act_fn gelu: diffusers builds the
    # projection with SiLU regardless, which the golden pins down.
    "sd1_class": dict(
        SD1,
        act_fn="gelu",
        class_embed_type="projection",
        projection_class_embeddings_input_dim=12,
    ),
}

# case -> (config, batch, channels, height, width, timesteps, tokens)
CASES = {
    "sd1": ("sd1", 1, 4, 8, 8, [500.0], 5),
    "sd1_nonsquare_b2": ("sd1", 2, 4, 8, 16, [10.5, 999.25], 7),
    "sd2": ("sd2", 2, 4, 8, 8, [3.0, 751.5], 6),
    # 6x10 is not a multiple of 2**num_upsamplers = 4: upsample sizes are forwarded.
    "sd2_odd": ("sd2", 1, 4, 6, 10, [321.0], 4),
    "sd1_class_b2": ("sd1_class", 2, 4, 8, 8, [42.0, 900.0], 5),
}


def main():
    torch.manual_seed(0)
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = UNet2DConditionModel(**cfg).eval()
        reinit(model, 1000 + i)
        model.save_pretrained(os.path.join(ROOT, name), safe_serialization=True)
        print("wrote model", name, sum(p.numel() for p in model.parameters()), "params")
    for j, (case, (cfg_name, b, c, h, w, ts, tokens)) in enumerate(CASES.items()):
        model = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, cfg_name)).eval()
        g = torch.Generator().manual_seed(2000 + j)
        sample = torch.randn((b, c, h, w), generator=g)
        cross = CONFIGS[cfg_name]["cross_attention_dim"]
        enc = torch.randn((b, tokens, cross), generator=g)
        timesteps = torch.tensor(ts, dtype=torch.float32)
        tensors = {
            "sample": sample.contiguous(),
            "timesteps": timesteps,
            "encoder_hidden_states": enc.contiguous(),
        }
        dim = CONFIGS[cfg_name].get("projection_class_embeddings_input_dim")
        if dim is not None:
            tensors["class_labels"] = torch.randn((b, dim), generator=g)
        with torch.no_grad():
            out = model(
                sample, timesteps, encoder_hidden_states=enc, class_labels=tensors.get("class_labels")
            ).sample
        tensors["output"] = out.contiguous()
        path = os.path.join(ROOT, f"case_{case}.safetensors")
        save_file(
            tensors,
            path,
            metadata={"model": cfg_name},
        )
        print("wrote", path, tuple(out.shape), "max|out|", out.abs().max().item())
    with open(os.path.join(ROOT, "reference.json"), "w") as f:
        json.dump(
            {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "safetensors": safetensors.__version__,
                "script": "scripts/golden/unet.py",
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()

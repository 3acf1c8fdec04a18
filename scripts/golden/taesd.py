"""Golden fixtures for ensueno's AutoencoderTiny (TAESD).

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/taesd.py

Writes crates/ensueno/tests/fixtures/taesd/
  <variant>/{config.json,diffusion_pytorch_model.safetensors,io.safetensors}
      tiny random-weight diffusers AutoencoderTiny models (diffusers layout) with
      encode / decode inputs and outputs;
  real_io.safetensors
      the real TAESD (madebyollin, from $ENSUENO_SHARED or /work/shared,
      weights/taesd/taesd_{encoder,decoder}.safetensors, bf16 -> f32) loaded into
      diffusers' AutoencoderTiny: encode of a [1,3,64,64] image and decode of a
      [1,4,8,8] latent. Skipped when the shared folder is missing.
"""

import json
import os

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures", "taesd")
SHARED = os.environ.get("ENSUENO_SHARED", "/work/shared")

META = {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__}


def tiny_variant(name, seed, image_hw, **config):
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoencoderTiny(**config).eval()
    with torch.no_grad():
        # Default init gives tiny activations after several ReLU blocks; a
        # larger spread keeps every layer's contribution visible.
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) * (2.0 / fan_in) ** 0.5)
    model.save_pretrained(out, safe_serialization=True)

    g = torch.Generator().manual_seed(seed + 1)
    image = torch.rand((2, config["in_channels"], *image_hw), generator=g) * 2 - 1
    with torch.no_grad():
        latents = model.encode(image).latents
        lat_in = torch.randn(latents.shape, generator=g) * 2.0  # some beyond the +-3 soft clamp
        decoded = model.decode(lat_in).sample
    save_file(
        {
            "image": image.contiguous(),
            "latents": latents.contiguous(),
            "decode_input": lat_in.contiguous(),
            "decoded": decoded.contiguous(),
        },
        os.path.join(out, "io.safetensors"),
        metadata=META,
    )
    print(f"wrote {out}: image {tuple(image.shape)} -> latents {tuple(latents.shape)}; "
          f"decode {tuple(lat_in.shape)} -> {tuple(decoded.shape)}")


def taesd_to_diffusers(encoder_sd, decoder_sd):
    """ComfyUI / madebyollin names -> diffusers: the encoder Sequential has the
    same numbering; the decoder's starts with a Clamp at index 0, so shift by one."""
    out = {}
    for k, v in encoder_sd.items():
        out["encoder.layers." + k] = v
    for k, v in decoder_sd.items():
        i, rest = k.split(".", 1)
        out[f"decoder.layers.{int(i) - 1}.{rest}"] = v
    return out


def real_taesd():
    src = os.path.join(SHARED, "weights", "taesd")
    enc_path = os.path.join(src, "taesd_encoder.safetensors")
    if not os.path.isfile(enc_path):
        print(f"skipped real TAESD: {enc_path} not found")
        return
    enc = {k: v.float() for k, v in load_file(enc_path).items()}
    dec = {k: v.float() for k, v in load_file(os.path.join(src, "taesd_decoder.safetensors")).items()}
    model = AutoencoderTiny().eval()  # defaults = SD 1.x/2.x TAESD
    model.load_state_dict(taesd_to_diffusers(enc, dec), strict=True)
    g = torch.Generator().manual_seed(1234)
    latents = torch.randn((1, 4, 8, 8), generator=g)
    image = torch.rand((1, 3, 64, 64), generator=g) * 2 - 1
    with torch.no_grad():
        decoded = model.decode(latents).sample
        encoded = model.encode(image).latents
    meta = dict(META, weights="madebyollin taesd_{encoder,decoder}.safetensors (bf16) as f32")
    save_file(
        {"latents": latents, "decoded": decoded.contiguous(), "image": image, "encoded": encoded.contiguous()},
        os.path.join(OUT, "real_io.safetensors"),
        metadata=meta,
    )
    print(f"wrote {OUT}/real_io.safetensors: decoded range [{decoded.min():.3f}, {decoded.max():.3f}]")


def main():
    os.makedirs(OUT, exist_ok=True)
    tiny_variant(
        "tiny_relu",
        0,
        (32, 32),
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 2, 1, 1),
        num_decoder_blocks=(1, 2, 1, 1),
        latent_channels=4,
    )
    tiny_variant(
        "tiny_mish",
        10,
        (16, 24),
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        latent_channels=2,
        act_fn="mish",
        upsampling_scaling_factor=2,
    )
    real_taesd()


if __name__ == "__main__":
    main()

"""Golden fixtures for ensueno's ConvVAE (the Keras VAE example).

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/conv_vae.py

Writes crates/ensueno/tests/fixtures/conv_vae/
  config.json        the model config (ensueno's ConvVAEConfig keys)
  model.safetensors  seeded random weights of the PyTorch twin (scripts/twins/vae.py)
  io.safetensors     inputs x [4,1,28,28] in [0,1] (binarised half), eps [4,2];
                     outputs z_mean, z_log_var, z, logits, decoded;
                     losses total / reconstruction / kl (0-d);
                     grad.<param> gradients of the total loss for a few parameters
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts", "twins"))
from vae import ConvVAE, vae_loss  # noqa: E402

OUT = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures", "conv_vae")
GRAD_PARAMS = [
    "encoder.conv1.weight",
    "encoder.conv1.bias",
    "encoder.conv2.weight",
    "encoder.z_log_var.weight",
    "decoder.dense.bias",
    "decoder.deconv1.weight",
    "decoder.deconv2.weight",
    "decoder.deconv3.weight",
    "decoder.deconv3.bias",
]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    config = dict(in_channels=1, sample_size=28, conv_channels=[32, 64], dense_dim=16, latent_dim=2)
    model = ConvVAE(**config)
    with torch.no_grad():
        # Default biases are small; larger ones make every term visible.
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        # A latent far from the prior gives the KL term a visible size.
        model.encoder.z_mean.weight.mul_(10.0)
        model.encoder.z_log_var.weight.mul_(5.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "model.safetensors"))
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump({"_class_name": "ConvVAE", **config}, f, indent=2)

    g = torch.Generator().manual_seed(1)
    x = torch.rand((4, 1, 28, 28), generator=g)
    x[:2] = (x[:2] > 0.5).float()
    eps = torch.randn((4, 2), generator=g)
    z_mean, z_log_var, z, logits = model(x, eps)
    total, recon, kl = vae_loss(x, z_mean, z_log_var, logits)
    total.backward()
    params = dict(model.named_parameters())
    io = {
        "x": x,
        "eps": eps,
        "z_mean": z_mean,
        "z_log_var": z_log_var,
        "z": z,
        "logits": logits,
        "decoded": torch.sigmoid(model.decoder(z_mean)),
        "loss.total": total,
        "loss.reconstruction": recon,
        "loss.kl": kl,
    }
    for name in GRAD_PARAMS:
        io["grad." + name] = params[name].grad
    io = {k: v.detach().contiguous().float() for k, v in io.items()}
    meta = {"torch": torch.__version__, "numpy": np.__version__, "note": "decoded = sigmoid(decoder(z_mean))"}
    save_file(io, os.path.join(OUT, "io.safetensors"), metadata=meta)
    print(f"wrote {OUT}: losses total {total.item():.4f} recon {recon.item():.4f} kl {kl.item():.4f}")


if __name__ == "__main__":
    main()

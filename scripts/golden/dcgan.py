"""Golden fixtures for ensueno's DCGAN generator and discriminator.

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/dcgan.py

Writes crates/ensueno/tests/fixtures/dcgan/<variant>/ for a class-conditional
and an unconditional tiny model (the PyTorch twin of scripts/twins/gan.py):
  generator/{config.json,model.safetensors}
  discriminator/{config.json,model.safetensors}
      seeded random weights, BatchNorm running statistics set to random values
  io.safetensors
      inputs z, labels (int64, conditional only), real images in [-1, 1];
      eval-mode outputs: eval.fake (G), eval.real_logits (D on real);
      then, in train mode (batch statistics), in this order:
        fake = G(z, labels); real_logits = D(real, labels); fake_logits = D(fake, labels)
      train.fake, train.real_logits, train.fake_logits, loss.d, loss.g (0-d),
      the running statistics after those forwards (stats.<g|d>.<bn>.running_<mean|var>),
      grad.g.<param> = d loss.g / d param (generator), grad.d.<param> = d loss.d / d param
      (discriminator).
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts", "twins"))
from gan import Discriminator, Generator, discriminator_loss, generator_loss  # noqa: E402

OUT = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures", "dcgan")
META = {"torch": torch.__version__, "numpy": np.__version__}


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif ".bn" in "." + n or n.startswith("bn"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif n.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def save_part(model, out, class_name, config):
    os.makedirs(out, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata=META)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"_class_name": class_name, **config}, f, indent=2)


def variant(name, seed, batch, config):
    out = os.path.join(OUT, name)
    torch.manual_seed(seed)
    g_model, d_model = Generator(**config), Discriminator(**config)
    randomise(g_model, seed + 10)
    randomise(d_model, seed + 20)
    save_part(g_model, os.path.join(out, "generator"), "DCGANGenerator", config)
    save_part(d_model, os.path.join(out, "discriminator"), "DCGANDiscriminator", config)

    gen = torch.Generator().manual_seed(seed + 1)
    s, c = config["sample_size"], config["channels"]
    z = torch.randn((batch, config["latent_dim"]), generator=gen)
    real = torch.rand((batch, c, s, s), generator=gen) * 2 - 1
    labels = None
    io = {"z": z, "real": real}
    if config["num_classes"] is not None:
        labels = torch.randint(0, config["num_classes"], (batch,), generator=gen)
        io["labels"] = labels

    g_model.eval()
    d_model.eval()
    with torch.no_grad():
        io["eval.fake"] = g_model(z, labels)
        io["eval.real_logits"] = d_model(real, labels)

    g_model.train()
    d_model.train()
    fake = g_model(z, labels)
    real_logits = d_model(real, labels)
    fake_logits = d_model(fake, labels)
    d_loss = discriminator_loss(real_logits, fake_logits)
    g_loss = generator_loss(fake_logits)
    d_params = dict(d_model.named_parameters())
    g_params = dict(g_model.named_parameters())
    d_grads = torch.autograd.grad(d_loss, list(d_params.values()), retain_graph=True)
    g_grads = torch.autograd.grad(g_loss, list(g_params.values()))
    io.update({
        "train.fake": fake, "train.real_logits": real_logits, "train.fake_logits": fake_logits,
        "loss.d": d_loss, "loss.g": g_loss,
    })
    for part, model in (("g", g_model), ("d", d_model)):
        for n, b in model.named_buffers():
            if "running" in n:
                io[f"stats.{part}.{n}"] = b
    for n, gr in zip(d_params, d_grads):
        io[f"grad.d.{n}"] = gr
    for n, gr in zip(g_params, g_grads):
        io[f"grad.g.{n}"] = gr
    io = {k: v.detach().contiguous() for k, v in io.items()}
    io = {k: (v if v.dtype == torch.int64 else v.float()) for k, v in io.items()}
    save_file(io, os.path.join(out, "io.safetensors"), metadata=META)
    print(f"wrote {out}: loss.d {d_loss.item():.5f} loss.g {g_loss.item():.5f}")


def main():
    variant(
        "conditional", 0, 6,
        dict(latent_dim=16, num_classes=10, sample_size=28, channels=1, base_channels=8, label_embedding_dim=50),
    )
    variant(
        "unconditional", 100, 5,
        dict(latent_dim=8, num_classes=None, sample_size=16, channels=3, base_channels=4, label_embedding_dim=50),
    )


if __name__ == "__main__":
    main()

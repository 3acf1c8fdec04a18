"""PyTorch twin of ensueno's ConvVAE and its training recipe.

The model is the Keras "Variational AutoEncoder" example
(keras.io/examples/generative/vae; Kingma & Welling, "Auto-Encoding
Variational Bayes", 2013, arXiv:1312.6114) with PyTorch layer semantics; its
module names are the safetensors keys ensueno loads.

Recipe (the Keras example): MNIST train + test (70,000 images) / 255, Adam
(lr 1e-3), batch 128, 30 epochs; loss = mean over the batch of the summed
per-pixel binary cross-entropy + KL divergence.

    /root/venvs/ensueno/bin/python scripts/twins/vae.py --epochs 1 --threads 2
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class Encoder(nn.Module):
    def __init__(self, in_channels=1, sample_size=28, conv_channels=(32, 64), dense_dim=16, latent_dim=2):
        super().__init__()
        c = in_channels
        for i, co in enumerate(conv_channels):
            setattr(self, f"conv{i + 1}", nn.Conv2d(c, co, 3, stride=2, padding=1))
            c = co
        self.n_conv = len(conv_channels)
        side = sample_size // 2 ** len(conv_channels)
        self.dense = nn.Linear(c * side * side, dense_dim)
        self.z_mean = nn.Linear(dense_dim, latent_dim)
        self.z_log_var = nn.Linear(dense_dim, latent_dim)

    def forward(self, x):
        for i in range(self.n_conv):
            x = F.relu(getattr(self, f"conv{i + 1}")(x))
        h = F.relu(self.dense(x.flatten(1)))
        return self.z_mean(h), self.z_log_var(h)


class Decoder(nn.Module):
    def __init__(self, in_channels=1, sample_size=28, conv_channels=(32, 64), dense_dim=16, latent_dim=2):
        super().__init__()
        self.side = sample_size // 2 ** len(conv_channels)
        self.top = conv_channels[-1]
        self.dense = nn.Linear(latent_dim, self.top * self.side * self.side)
        c = self.top
        outs = list(reversed(conv_channels))
        for i, co in enumerate(outs):
            setattr(self, f"deconv{i + 1}", nn.ConvTranspose2d(c, co, 3, stride=2, padding=1, output_padding=1))
            c = co
        self.n_up = len(outs)
        setattr(self, f"deconv{self.n_up + 1}", nn.ConvTranspose2d(c, in_channels, 3, stride=1, padding=1))

    def forward(self, z):
        """Returns logits; the image is their sigmoid."""
        x = F.relu(self.dense(z)).reshape(-1, self.top, self.side, self.side)
        for i in range(self.n_up):
            x = F.relu(getattr(self, f"deconv{i + 1}")(x))
        return getattr(self, f"deconv{self.n_up + 1}")(x)


class ConvVAE(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.encoder = Encoder(**config)
        self.decoder = Decoder(**config)
        # Keras' layer defaults, as ensueno's trainer does: Glorot-uniform
        # kernels, zero biases (PyTorch's own default is Kaiming-uniform).
        for name, p in self.named_parameters():
            if name.endswith(".weight"):
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, x, eps):
        z_mean, z_log_var = self.encoder(x)
        z = z_mean + torch.exp(0.5 * z_log_var) * eps
        return z_mean, z_log_var, z, self.decoder(z)


def vae_loss(x, z_mean, z_log_var, logits):
    """(total, reconstruction, kl) as the Keras example, BCE taken from logits."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    recon = bce.flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + z_log_var - z_mean.pow(2) - z_log_var.exp())).sum(1).mean()
    return recon + kl, recon, kl


def main():
    p = common.base_parser("ConvVAE twin (Keras VAE example)", epochs=30, batch_size=128, lr=1e-3)
    args = p.parse_args()
    common.setup(args)
    train_x, _ = common.load_mnist(args.data, "train")
    test_x, _ = common.load_mnist(args.data, "test")
    data = (torch.cat([train_x, test_x]).float() / 255.0).unsqueeze(1)
    data = data.to(args.device)
    model = ConvVAE().to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, eps=1e-7)  # Keras epsilon
    gen = torch.Generator().manual_seed(args.seed)
    common.log_start("vae", args, images=len(data), params=sum(p.numel() for p in model.parameters()))
    for epoch in range(args.epochs):
        log = common.EpochLog(epoch)
        for idx in common.batches(len(data), args.batch_size, gen, args.max_steps_per_epoch):
            x = data[idx]
            eps = torch.randn(x.shape[0], 2, generator=gen).to(args.device)
            z_mean, z_log_var, _, logits = model(x, eps)
            loss, recon, kl = vae_loss(x, z_mean, z_log_var, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.add(loss=loss.item(), reconstruction_loss=recon.item(), kl_loss=kl.item())
        log.emit()


if __name__ == "__main__":
    main()

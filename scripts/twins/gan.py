"""PyTorch twin of ensueno's class-conditional DCGAN and its training recipe.

DCGAN: Radford, Metz & Chintala, "Unsupervised Representation Learning with
Deep Convolutional Generative Adversarial Networks", 2015, arXiv:1511.06434;
class conditioning after Mirza & Osindero, "Conditional Generative
Adversarial Nets", 2014, arXiv:1411.1784. Module names are the safetensors
keys ensueno loads (generator/ and discriminator/ are separate files).

Recipe: MNIST train (60,000 images) scaled to [-1, 1], Adam(2e-4, betas
(0.5, 0.999)) for each network, batch 64, non-saturating loss (BCE with
logits), DCGAN init N(0, 0.02) (BatchNorm weights N(1, 0.02)); generated
images use random labels.

    /root/venvs/ensueno/bin/python scripts/twins/gan.py --epochs 1 --threads 2
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LABEL_EMBED_DIM = 50


class Generator(nn.Module):
    def __init__(self, latent_dim=100, num_classes=10, sample_size=28, channels=1, base_channels=64, label_embedding_dim=LABEL_EMBED_DIM):
        super().__init__()
        self.num_classes = num_classes
        self.side = sample_size // 4
        self.base = base_channels
        in_dim = latent_dim
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, label_embedding_dim)
            in_dim += label_embedding_dim
        # Layers followed by BatchNorm have no bias (it would be cancelled).
        self.fc = nn.Linear(in_dim, 2 * base_channels * self.side * self.side, bias=False)
        self.bn0 = nn.BatchNorm2d(2 * base_channels)
        self.deconv1 = nn.ConvTranspose2d(2 * base_channels, base_channels, 4, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.deconv2 = nn.ConvTranspose2d(base_channels, channels, 4, 2, 1)

    def forward(self, z, labels=None):
        if self.num_classes is not None:
            z = torch.cat([z, self.label_emb(labels)], dim=1)
        x = self.fc(z).reshape(-1, 2 * self.base, self.side, self.side)
        x = F.relu(self.bn0(x))
        x = F.relu(self.bn1(self.deconv1(x)))
        return torch.tanh(self.deconv2(x))


class Discriminator(nn.Module):
    def __init__(self, latent_dim=100, num_classes=10, sample_size=28, channels=1, base_channels=64, label_embedding_dim=LABEL_EMBED_DIM):
        super().__init__()
        self.num_classes = num_classes
        self.sample_size = sample_size
        extra = 0
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, label_embedding_dim)
            self.label_fc = nn.Linear(label_embedding_dim, sample_size * sample_size)
            extra = 1
        self.conv1 = nn.Conv2d(channels + extra, base_channels, 4, 2, 1)
        self.conv2 = nn.Conv2d(base_channels, 2 * base_channels, 4, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * base_channels)
        side = sample_size // 4
        self.fc = nn.Linear(2 * base_channels * side * side, 1)

    def forward(self, x, labels=None):
        if self.num_classes is not None:
            m = self.label_fc(self.label_emb(labels)).reshape(-1, 1, self.sample_size, self.sample_size)
            x = torch.cat([x, m], dim=1)
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.fc(x.flatten(1)).squeeze(1)


def discriminator_loss(real_logits, fake_logits):
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits):
    """Non-saturating: -log D(G(z))."""
    return F.softplus(-fake_logits).mean()


def dcgan_init(module):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def main():
    p = common.base_parser("class-conditional DCGAN twin", epochs=20, batch_size=64, lr=2e-4)
    p.add_argument("--latent-dim", type=int, default=100)
    p.add_argument("--base-channels", type=int, default=64)
    args = p.parse_args()
    common.setup(args)
    images, labels = common.load_mnist(args.data, "train")
    data = (images.float() / 127.5 - 1.0).unsqueeze(1)
    cfg = dict(latent_dim=args.latent_dim, num_classes=10, base_channels=args.base_channels)
    g, d = Generator(**cfg).to(args.device), Discriminator(**cfg).to(args.device)
    data, labels = data.to(args.device), labels.to(args.device)
    dcgan_init(g)
    dcgan_init(d)
    opt_g = torch.optim.Adam(g.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=args.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(args.seed)
    common.log_start(
        "gan", args, images=len(data),
        g_params=sum(p.numel() for p in g.parameters()), d_params=sum(p.numel() for p in d.parameters()),
    )
    for epoch in range(args.epochs):
        log = common.EpochLog(epoch)
        for idx in common.batches(len(data), args.batch_size, gen, args.max_steps_per_epoch):
            real, y = data[idx], labels[idx]
            n = real.shape[0]
            z = torch.randn(n, args.latent_dim, generator=gen).to(args.device)
            fake_y = torch.randint(0, 10, (n,), generator=gen).to(args.device)
            fake = g(z, fake_y)
            real_logits = d(real, y)
            fake_logits = d(fake.detach(), fake_y)
            d_loss = discriminator_loss(real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            fake_logits = d(fake, fake_y)
            g_loss = generator_loss(fake_logits)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            log.add(
                d_loss=d_loss.item(), g_loss=g_loss.item(),
                d_real=torch.sigmoid(real_logits).mean().item(), d_fake=torch.sigmoid(fake_logits).mean().item(),
            )
        log.emit()


if __name__ == "__main__":
    main()

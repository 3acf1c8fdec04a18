"""PyTorch twin of ensueno's class-conditional DDPM recipe on MNIST.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020,
arXiv:2006.11239; classifier-free guidance dropout after Ho & Salimans,
"Classifier-Free Diffusion Guidance", 2022, arXiv:2207.12598. Model: diffusers
`UNet2DModel`; noise schedule: diffusers `DDPMScheduler` (1000 steps, linear
betas 1e-4..0.02); loss: MSE between predicted and true noise.

Recipe: MNIST train scaled to [-1, 1], AdamW(lr 1e-3, weight decay 0),
batch 128; class labels replaced by the "no class" id 10 with probability 0.1.
`--config` (a JSON string or a path to a JSON file) overrides UNet2DModel's
config keys.

    /root/venvs/ensueno/bin/python scripts/twins/diffusion.py --epochs 1 --max-steps-per-epoch 50
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

UNET_CONFIG = dict(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    num_class_embeds=11,
)
NULL_CLASS = 10


def main():
    p = common.base_parser("class-conditional DDPM twin (diffusers UNet2DModel)", epochs=20, batch_size=128, lr=1e-3)
    p.add_argument("--config", default=None, help="JSON string or file overriding UNet2DModel config keys")
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    args = p.parse_args()
    common.setup(args)
    config = dict(UNET_CONFIG)
    if args.config:
        text = open(args.config).read() if os.path.exists(args.config) else args.config
        override = json.loads(text)
        config.update({k: v for k, v in override.items() if not k.startswith("_")})
    images, labels = common.load_mnist(args.data, "train")
    data = (images.float() / 127.5 - 1.0).unsqueeze(1)
    unet = UNet2DModel(**config).to(args.device)
    data, labels = data.to(args.device), labels.to(args.device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    common.log_start(
        "diffusion", args, images=len(data), unet_config=config, params=sum(p.numel() for p in unet.parameters())
    )
    unet.train()
    for epoch in range(args.epochs):
        log = common.EpochLog(epoch)
        for idx in common.batches(len(data), args.batch_size, gen, args.max_steps_per_epoch):
            x0, y = data[idx], labels[idx].clone()
            n = x0.shape[0]
            drop = (torch.rand(n, generator=gen) < args.cfg_dropout).to(args.device)
            y[drop] = NULL_CLASS
            noise = torch.randn(x0.shape, generator=gen).to(args.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen).to(args.device)
            noisy = scheduler.add_noise(x0, noise, t)
            pred = unet(noisy, t, class_labels=y).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.add(loss=loss.item())
        log.emit()


if __name__ == "__main__":
    main()

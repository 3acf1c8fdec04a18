"""Whole-pipeline golden outputs from diffusers for tiny Stable Diffusion models.

Builds two tiny random-weight pipelines in diffusers' folder layout:
  tiny-sd1: SD 1.x-like (epsilon prediction, PNDM-style scheduler config,
            conv projections, one head count for every block, quick_gelu CLIP,
            <|endoftext|> padding);
  tiny-sd2: SD 2.x-like (v-prediction, DDIM-style scheduler config, linear
            projections, per-block head counts, gelu CLIP, "!" padding).
Then runs diffusers' StableDiffusionPipeline on fixed initial latents (saved as
.npy, the `--latents` input of `ensueno generate`) for several schedulers and
saves the float images diffusers returns (output_type="np") and the 8-bit
images it would write.

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/pipeline.py
Outputs go to crates/ensueno/tests/fixtures/pipeline/.
"""

import json
import os
import shutil
import zlib

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
import diffusers.models.autoencoders.vae as diffusers_vae
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as diffusers_img2img
import diffusers
import transformers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join("crates", "ensueno", "tests", "fixtures")
OUT = os.path.join(ROOT, "pipeline")
TOKENIZER = os.path.join(ROOT, "tiny_clip_tokenizer")

torch.set_num_threads(2)


def reinit(module, seed, std=0.1):
    """Seeded non-trivial weights everywhere (diffusers zero-inits some layers,
    which would let a wrong implementation pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") or "layer_norm" in name and name.endswith("weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm3.weight") or "group_norm.weight" in name or "conv_norm_out.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def build(kind):
    tok = CLIPTokenizer(
        os.path.join(TOKENIZER, "vocab.json"),
        os.path.join(TOKENIZER, "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>" if kind == "sd1" else "!",
    )
    hidden = 32 if kind == "sd1" else 48
    text_config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden + 5,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if kind == "sd1" else "gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=hidden,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config).eval()
    reinit(text_encoder, 1, std=0.2)

    if kind == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=hidden,
            attention_head_dim=2,
            norm_num_groups=8,
        )
        scheduler_config = {
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        }
    else:
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=hidden,
            attention_head_dim=(1, 2, 2),
            use_linear_projection=True,
            norm_num_groups=8,
        )
        scheduler_config = {
            "_class_name": "DDIMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        }
    unet.eval()
    reinit(unet, 2, std=0.08)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()
    reinit(vae, 3, std=0.08)

    if kind == "sd2":
        # SD 2.x checkpoints are usually shipped in half precision: store the
        # weights as f16 (and compute the reference from exactly those values).
        for m in (text_encoder, unet, vae):
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(p.half().float())

    scheduler = DDIMScheduler.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = os.path.join(OUT, f"tiny-{kind}")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Keep the scheduler config the real checkpoints ship (save_pretrained
    # would write the DDIM instance's fully expanded config).
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config, f, indent=2)
    if kind == "sd1":
        # transformers 5 saves CLIPTextModel without the "text_model." prefix;
        # checkpoints on the hub (saved by transformers 4) have it. Keep one
        # fixture in each layout.
        path = os.path.join(folder, "text_encoder", "model.safetensors")
        tensors = {"text_model." + k: v.contiguous() for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    if kind == "sd2":
        for comp, fname in (("text_encoder", "model.safetensors"), ("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
            path = os.path.join(folder, comp, fname)
            tensors = {k: v.half().contiguous() for k, v in load_file(path).items()}
            save_file(tensors, path, metadata={"format": "pt"})
    if not hasattr(text_encoder, "text_model"):
        # diffusers 0.42's clip_skip path reads text_encoder.text_model, which
        # transformers 5 no longer has; alias it without registering a module.
        text_encoder.__dict__["text_model"] = text_encoder
    return pipe, scheduler_config


SCHEDULERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "dpm++2m": lambda c: DPMSolverMultistepScheduler.from_config(c),
    "dpm++2m-karras": lambda c: DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True),
}

CASES = [
    # name, kind, scheduler, prompt, negative, steps, guidance, batch, (height, width), clip_skip
    ("sd1_ddim", "sd1", "ddim", "a red apple on a tree", "", 8, 7.5, 1, (64, 64), None),
    ("sd1_euler", "sd1", "euler", "a red apple on a tree", "blurry", 8, 7.5, 1, (64, 64), None),
    ("sd1_dpm2m_batch2", "sd1", "dpm++2m", "an elephant, watercolor", "ugly", 8, 5.0, 2, (64, 64), None),
    ("sd1_dpm2m_karras_wide", "sd1", "dpm++2m-karras", "a small house", "", 6, 7.5, 1, (48, 64), None),
    ("sd1_euler_noguidance", "sd1", "euler", "a cat", "", 5, 1.0, 1, (64, 64), None),
    ("sd2_ddim", "sd2", "ddim", "a red apple on a tree", "", 8, 7.5, 1, (64, 64), None),
    ("sd2_euler", "sd2", "euler", "a mountain lake at dawn", "fog", 8, 7.5, 1, (64, 64), None),
    ("sd2_dpm2m_clipskip", "sd2", "dpm++2m", "a portrait of a dog", "", 8, 6.0, 1, (64, 64), 1),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    pipes = {k: build(k) for k in ("sd1", "sd2")}
    index = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cases": [],
    }
    for name, kind, sched, prompt, negative, steps, guidance, batch, (h, w), clip_skip in CASES:
        pipe, sconf = pipes[kind]
        pipe.scheduler = SCHEDULERS[sched](sconf)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        latents = torch.randn((batch, 4, h // 8, w // 8), generator=g, dtype=torch.float32)
        np.save(os.path.join(OUT, f"{name}.latents.npy"), latents.numpy())
        with torch.no_grad():
            out = pipe(
                prompt=prompt,
                negative_prompt=negative if guidance > 1 else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=h,
                width=w,
                num_images_per_prompt=batch,
                latents=latents,
                output_type="np",
                clip_skip=clip_skip,
            ).images
        images = np.ascontiguousarray(out.transpose(0, 3, 1, 2).astype(np.float32))
        pixels = np.ascontiguousarray((out * 255).round().astype("uint8").transpose(0, 3, 1, 2))
        save_file(
            {"images": torch.from_numpy(images), "pixels": torch.from_numpy(pixels.astype(np.float32))},
            os.path.join(OUT, f"{name}.expected.safetensors"),
        )
        saturated = float(((pixels == 0) | (pixels == 255)).mean())
        print(f"{name}: images {images.shape}, mean {images.mean():.3f} std {images.std():.3f}, saturated {saturated:.3f}")
        index["cases"].append(
            {
                "name": name,
                "model": f"tiny-{kind}",
                "scheduler": sched,
                "prompt": prompt,
                "negative_prompt": negative,
                "steps": steps,
                "guidance_scale": guidance,
                "batch": batch,
                "height": h,
                "width": w,
                "clip_skip": clip_skip or 0,
            }
        )
    index["img2img_cases"] = img2img(pipes)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(index, f, indent=2)
    print("wrote", OUT)


IMG2IMG_CASES = [
    # name, kind, scheduler, prompt, negative, steps, guidance, strength
    ("sd1_img2img_ddim", "sd1", "ddim", "a watercolor of a house", "", 10, 7.5, 0.6),
    ("sd1_img2img_euler", "sd1", "euler", "an oil painting", "blurry", 8, 6.0, 0.8),
    ("sd2_img2img_dpm2m", "sd2", "dpm++2m", "a sketch", "", 10, 7.5, 0.5),
]


def init_image():
    """A deterministic 64x64 test picture: gradients and a disc."""
    y, x = np.mgrid[0:64, 0:64]
    r = (x * 4).astype(np.uint8)
    g = (y * 4).astype(np.uint8)
    b = np.where((x - 30) ** 2 + (y - 34) ** 2 < 200, 230, 40).astype(np.uint8)
    return Image.fromarray(np.stack([r, g, b], axis=-1), "RGB")


def img2img(pipes):
    """img2img draws two N(0,1) tensors: the VAE posterior sample, then the
    noise added to the init latents. Feed both from fixed, saved arrays so the
    Rust side can use the same ones."""
    img = init_image()
    img.save(os.path.join(OUT, "init.png"))
    cases = []
    for name, kind, sched, prompt, negative, steps, guidance, strength in IMG2IMG_CASES:
        pipe, sconf = pipes[kind]
        i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
        i2i.scheduler = SCHEDULERS[sched](sconf)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        posterior = torch.randn((1, 4, 8, 8), generator=g)
        noise = torch.randn((1, 4, 8, 8), generator=g)
        queue = [posterior, noise]
        used = []

        def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
            t = queue.pop(0)
            assert tuple(shape) == tuple(t.shape), (shape, t.shape)
            used.append(t)
            return t.to(dtype=dtype or t.dtype)

        orig = (diffusers_vae.randn_tensor, diffusers_img2img.randn_tensor)
        diffusers_vae.randn_tensor = fake_randn
        diffusers_img2img.randn_tensor = fake_randn
        try:
            with torch.no_grad():
                out = i2i(
                    prompt=prompt,
                    negative_prompt=negative if guidance > 1 else None,
                    image=img,
                    strength=strength,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    output_type="np",
                ).images
        finally:
            diffusers_vae.randn_tensor, diffusers_img2img.randn_tensor = orig
        assert len(used) == 2 and not queue, "img2img did not draw exactly the two saved tensors"
        np.save(os.path.join(OUT, f"{name}.posterior.npy"), posterior.numpy())
        np.save(os.path.join(OUT, f"{name}.noise.npy"), noise.numpy())
        images = np.ascontiguousarray(out.transpose(0, 3, 1, 2).astype(np.float32))
        pixels = np.ascontiguousarray((out * 255).round().astype("uint8").transpose(0, 3, 1, 2))
        save_file(
            {"images": torch.from_numpy(images), "pixels": torch.from_numpy(pixels.astype(np.float32))},
            os.path.join(OUT, f"{name}.expected.safetensors"),
        )
        print(f"{name}: images {images.shape}, mean {images.mean():.3f}")
        cases.append(
            {
                "name": name,
                "model": f"tiny-{kind}",
                "scheduler": sched,
                "prompt": prompt,
                "negative_prompt": negative,
                "steps": steps,
                "guidance_scale": guidance,
                "strength": strength,
                "batch": 1,
                "height": 64,
                "width": 64,
                "clip_skip": 0,
            }
        )
    return cases


if __name__ == "__main__":
    main()

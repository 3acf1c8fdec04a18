"""Writes a Stable Diffusion 1.5-shaped pipeline with random weights.

Same architecture and tensor shapes as runwayml/stable-diffusion-v1-5 (UNet
859M, CLIP ViT-L/14 text encoder 123M, VAE 84M parameters), generated at run
time from a seed and never committed. Used by scripts/bench_sd15.sh to time
ensueno against diffusers on identical weights.

    python scripts/bench/sd15_random.py OUT_DIR
"""

import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = os.environ.get('ENSUENO_CLIP_VOCAB') or os.path.join(HERE, '..', '..', 'crates', 'ensueno', 'tests', 'fixtures', 'clip_tokenizer')


def main(out):
    torch.manual_seed(0)
    tok = CLIPTokenizer(os.path.join(VOCAB, "vocab.json"), os.path.join(VOCAB, "merges.txt"), model_max_length=77)
    # Config of openai/clip-vit-large-patch14's text tower (SD 1.5's text_encoder/config.json).
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    # runwayml/stable-diffusion-v1-5 unet/config.json (defaults of diffusers
    # equal the remaining keys).
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # runwayml/stable-diffusion-v1-5 vae/config.json.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    sched = {
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
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler.from_config(sched),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if os.path.isdir(out):
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])

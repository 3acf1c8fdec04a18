"""Whole-pipeline golden outputs from diffusers for a tiny BERT-conditioned,
TAESD-decoded Stable Diffusion model (the layout of ensueno's own shipped
model, as `save_pipeline_folder` in crates/ensueno/src/train/text2image.rs
writes it).

Builds crates/ensueno/tests/fixtures/pipeline/tiny-bert-taesd/:
  text_encoder: transformers BertModel with the tiny config of
                tests/fixtures/bert/tiny (hidden 32, vocab 1000) plus
                "use_attention_mask": true, random non-trivial weights;
  tokenizer:    that folder's tokenizer.json (padding/truncation cleared, as
                save_pipeline_folder does), a vocab.txt derived from it and a
                tokenizer_config.json with model_max_length 16;
  unet:         UNet2DConditionModel (DownBlock2D + CrossAttnDownBlock2D,
                block_out_channels (16, 32), cross_attention_dim 32),
                reinitialised, weights stored in f16 (fixture size);
  vae:          AutoencoderTiny with 8 channels and one block per level,
                He-initialised, its last conv rescaled so that generated
                latents decode mostly inside [-1, 1] (few clamped pixels);
  scheduler:    DPMSolverMultistepScheduler (scaled_linear 0.00085..0.012,
                "leading" spacing, steps_offset 1, dpmsolver++, order 2).
Then loads that folder back with diffusers' StableDiffusionPipeline.from_pretrained
(so the reference reads exactly the files ensueno reads) and runs it on fixed
initial latents (saved as .npy) for several prompts and schedulers, and
StableDiffusionImg2ImgPipeline for one img2img case (TAESD's encoder is
deterministic, so the only random draw is the added noise, fed from a saved
array). Cases marked use_attention_mask=false are run on a copy of the folder
whose text_encoder/config.json says "use_attention_mask": false (the Rust test
makes the same copy), so both of diffusers' encode_prompt paths are covered.

Also builds crates/ensueno/tests/fixtures/pipeline/tiny-bert-taesd-sentence-unet/unet:
a UNet like the one above with Stable unCLIP's projection class embedding,
which ensueno feeds the prompt's sentence embedding (the BERT token states
averaged over the real tokens, L2-normalised, times sqrt(hidden size)). The
"sentence" cases run on a copy of the folder with that UNet (the Rust test
makes the same copy); StableDiffusionPipeline has no argument for class
labels, so they are handed to the UNet's forward in the pipeline's
[negative, positive] batch order.

Saves, next to the folder, bert_<case>.latents.npy / .noise.npy (inputs),
bert_<case>.expected.safetensors (the float images diffusers returns with
output_type="np", NCHW f32, and the 8-bit images it would write, uint8),
bert_init.png (the img2img input) and bert_cases.json (cases and versions).
Deterministic: a rerun rewrites identical bytes.

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/pipeline_bert.py
"""

import json
import os
import shutil
import tempfile
import zlib

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as diffusers_img2img
import diffusers
import tokenizers
import transformers
from transformers import BertConfig, BertModel, BertTokenizerFast

ROOT = os.path.join("crates", "ensueno", "tests", "fixtures")
OUT = os.path.join(ROOT, "pipeline")
MODEL = os.path.join(OUT, "tiny-bert-taesd")
SENTENCE_UNET = os.path.join(OUT, "tiny-bert-taesd-sentence-unet")
BERT = os.path.join(ROOT, "bert", "tiny")
PREFIX = "bert_"

MAX_TOKENS = 16

torch.set_num_threads(2)

# As crates/ensueno/src/train/text2image.rs writes them.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "BertModel"],
    "tokenizer": ["transformers", "BertTokenizerFast"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderTiny"],
}
SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}
TOKENIZER_CONFIG = {
    "tokenizer_class": "BertTokenizer",
    "do_lower_case": True,
    "model_max_length": MAX_TOKENS,
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "mask_token": "[MASK]",
    "tokenize_chinese_chars": True,
    "strip_accents": None,
    "clean_up_tokenization_spaces": True,
}


def reinit(module, seed, std=0.1):
    """Seeded non-trivial weights everywhere (diffusers zero-inits some layers,
    which would let a wrong implementation pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            is_norm = "norm" in leaf or "LayerNorm" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def reinit_he(module, seed):
    """TAESD has no norms: He-scaled weights keep every ReLU block active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def calibrate_decoder(vae, z):
    """He-initialised, the decoder's output is far outside [-1, 1] and almost
    every pixel would clamp to 0 or 255, hiding errors. Rescale its last conv
    so that the latents `z` this model actually generates decode to a mean of
    ~0 and a std of ~0.5 in [-1, 1] (most pixels unclamped)."""
    last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        x = vae.decode(z).sample
        scale = 0.5 / x.std().item()
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        x = vae.decode(z).sample  # = 2 * conv(h) - 1
        last.bias.sub_(x.mean(dim=(0, 2, 3)) / 2)
        x = vae.decode(z).sample
    print(f"decoder calibrated: output mean {x.mean():.3f} std {x.std():.3f}")


def sample_latents(text_encoder, unet, vae):
    """Final latents of a few seeded generations, for calibrate_decoder."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=BertTokenizerFast.from_pretrained(os.path.join(MODEL, "tokenizer")),
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return pipe(
            prompt=["a red apple", "an elephant"],
            num_inference_steps=6,
            guidance_scale=7.5,
            height=32,
            width=32,
            num_images_per_prompt=2,
            latents=torch.randn((4, 4, 4, 4), generator=g),
            output_type="latent",
        ).images


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def write_tokenizer(dst):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(BERT, "tokenizer.json")) as f:
        tok = json.load(f)
    # transformers ignores these; save_pipeline_folder clears them too.
    tok["padding"] = None
    tok["truncation"] = None
    write_json(os.path.join(dst, "tokenizer.json"), tok)
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    lines = [by_id.get(i, f"[unused{i}]") for i in range(max(by_id) + 1)]
    with open(os.path.join(dst, "vocab.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_json(os.path.join(dst, "tokenizer_config.json"), TOKENIZER_CONFIG)


def tiny_unet(cross_attention_dim, seed, **extra):
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        # Narrower than the shipped model to keep the fixture small.
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    ).eval()
    reinit(unet, seed, std=0.08)
    # The UNet is stored in half precision (as most SD checkpoints are) to
    # keep the fixture small; the reference computes in f32 from exactly
    # those values, as ensueno does.
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
    return unet


def save_unet_f16(unet, folder):
    unet.save_pretrained(folder, safe_serialization=True)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = {k: v.half().contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def class_labels(pipe, text):
    """ensueno's class labels for a prompt: the scaled sentence embedding."""
    t = pipe.tokenizer([text], padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(t.input_ids, attention_mask=t.attention_mask)[0]
    mask = t.attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) * hidden.shape[-1] ** 0.5


def feed_class_labels(pipe, prompt, negative, guidance, batch):
    """Hands the prompt's class labels to every UNet call of the pipeline."""
    labels = class_labels(pipe, prompt).repeat(batch, 1)
    if guidance > 1.0:
        labels = torch.cat([class_labels(pipe, negative).repeat(batch, 1), labels])
    forward = type(pipe.unet).forward.__get__(pipe.unet)

    def with_labels(*args, **kwargs):
        kwargs["class_labels"] = labels
        return forward(*args, **kwargs)

    pipe.unet.forward = with_labels


def build():
    """Writes the model folder; returns nothing (the reference reloads it)."""
    config = BertConfig.from_pretrained(BERT)
    torch.manual_seed(0)
    text_encoder = BertModel(config).eval()
    reinit(text_encoder, 1, std=0.2)

    unet = tiny_unet(config.hidden_size, 2)

    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()
    reinit_he(vae, 3)

    if os.path.isdir(MODEL):
        shutil.rmtree(MODEL)
    os.makedirs(MODEL)
    write_tokenizer(os.path.join(MODEL, "tokenizer"))
    calibrate_decoder(vae, sample_latents(text_encoder, unet, vae))
    save_unet_f16(unet, os.path.join(MODEL, "unet"))
    if os.path.isdir(SENTENCE_UNET):
        shutil.rmtree(SENTENCE_UNET)
    sentence_unet = tiny_unet(
        config.hidden_size,
        4,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=config.hidden_size,
    )
    save_unet_f16(sentence_unet, os.path.join(SENTENCE_UNET, "unet"))
    vae.save_pretrained(os.path.join(MODEL, "vae"), safe_serialization=True)
    text_encoder.save_pretrained(os.path.join(MODEL, "text_encoder"), safe_serialization=True)
    te_config_path = os.path.join(MODEL, "text_encoder", "config.json")
    with open(te_config_path) as f:
        te_config = json.load(f)
    te_config["use_attention_mask"] = True
    te_config["architectures"] = ["BertModel"]
    write_json(te_config_path, te_config)
    os.makedirs(os.path.join(MODEL, "scheduler"))
    write_json(os.path.join(MODEL, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    write_json(os.path.join(MODEL, "model_index.json"), MODEL_INDEX)


def load(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert type(pipe.text_encoder).__name__ == "BertModel", type(pipe.text_encoder)
    assert type(pipe.vae).__name__ == "AutoencoderTiny", type(pipe.vae)
    assert isinstance(pipe.tokenizer, BertTokenizerFast), type(pipe.tokenizer)
    assert pipe.tokenizer.model_max_length == MAX_TOKENS
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_tokenizer(pipe):
    """transformers' tokenizer (the reference) must agree with the raw
    tokenizer.json that ensueno reads."""
    raw = tokenizers.Tokenizer.from_file(os.path.join(MODEL, "tokenizer", "tokenizer.json"))
    raw.enable_truncation(MAX_TOKENS)
    raw.enable_padding(length=MAX_TOKENS, pad_id=0, pad_token="[PAD]")
    for text in [c[3] for c in CASES] + ["", LONG]:
        ref = pipe.tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=True)
        got = raw.encode(text)
        assert ref.input_ids == got.ids, (text, ref.input_ids, got.ids)
        assert ref.attention_mask == got.attention_mask, text


LONG = "the quick brown fox jumps over the lazy dog and the elephant and a red apple, smiling face"

SCHEDULERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "dpm++2m": lambda c: DPMSolverMultistepScheduler.from_config(c),
}

CASES = [
    # name, variant (use_attention_mask, or "sentence"), scheduler, prompt, negative, steps,
    # guidance, batch, (height, width)
    # (height, width) None: the model's default size, sample_size * 8 = 64.
    ("dpm2m", True, "dpm++2m", "a red apple", "", 8, 7.5, 1, None),
    ("dpm2m_empty_prompt", True, "dpm++2m", "", "", 6, 7.5, 1, (32, 32)),
    ("euler_long_prompt", True, "euler", LONG, "lazy dog", 6, 6.0, 1, (32, 32)),
    ("ddim_noguidance", True, "ddim", "an elephant", "", 6, 1.0, 1, (32, 32)),
    ("dpm2m_batch2", True, "dpm++2m", "a smiling face", "brown", 6, 5.0, 2, (32, 48)),
    ("nomask_dpm2m", False, "dpm++2m", "a red apple", "", 8, 7.5, 1, (32, 32)),
    ("nomask_euler_long_prompt", False, "euler", LONG, "", 6, 4.0, 1, (32, 32)),
    ("nomask_ddim_noguidance", False, "ddim", "the lazy fox", "", 5, 1.0, 1, (32, 32)),
    # "sentence": the UNet with the class embedding (attention mask on).
    ("sentence_dpm2m", "sentence", "dpm++2m", "a red apple", "", 8, 7.5, 1, (32, 32)),
    ("sentence_euler_batch2", "sentence", "euler", "an elephant", "brown", 6, 5.0, 2, (32, 32)),
    ("sentence_ddim_noguidance", "sentence", "ddim", "a smiling face", "", 5, 1.0, 1, (32, 32)),
]

IMG2IMG_CASES = [
    # name, use_attention_mask, scheduler, prompt, negative, steps, guidance, strength
    ("img2img_dpm2m", True, "dpm++2m", "a red apple", "blurry", 10, 7.5, 0.6),
    ("img2img_euler", True, "euler", "an elephant", "", 8, 6.0, 0.5),
]


def save_images(name, out):
    images = np.ascontiguousarray(out.transpose(0, 3, 1, 2).astype(np.float32))
    pixels = np.ascontiguousarray((out * 255).round().astype("uint8").transpose(0, 3, 1, 2))
    save_file(
        {"images": torch.from_numpy(images), "pixels": torch.from_numpy(pixels)},
        os.path.join(OUT, f"{PREFIX}{name}.expected.safetensors"),
    )
    saturated = float(((pixels == 0) | (pixels == 255)).mean())
    print(f"{name}: images {images.shape}, mean {images.mean():.3f} std {images.std():.3f}, saturated {saturated:.3f}")


def case_entry(name, variant, sched, prompt, negative, steps, guidance, batch, h, w, strength=0.0):
    sentence = variant == "sentence"
    return {
        "name": f"{PREFIX}{name}",
        "model": "tiny-bert-taesd-sentence" if sentence else "tiny-bert-taesd",
        "use_attention_mask": True if sentence else variant,
        "scheduler": sched,
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": steps,
        "guidance_scale": guidance,
        "batch": batch,
        "height": h,
        "width": w,
        "clip_skip": 0,
        "strength": strength,
        "default_size": False,
    }


def txt2img(pipes):
    cases = []
    for name, mask, sched, prompt, negative, steps, guidance, batch, size in CASES:
        pipe = pipes[mask]
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        assert default == 64, default
        h, w = size or (default, default)
        pipe.scheduler = SCHEDULERS[sched](SCHEDULER_CONFIG)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        latents = torch.randn((batch, 4, h // 8, w // 8), generator=g, dtype=torch.float32)
        np.save(os.path.join(OUT, f"{PREFIX}{name}.latents.npy"), latents.numpy())
        if mask == "sentence":
            feed_class_labels(pipe, prompt, negative, guidance, batch)
        with torch.no_grad():
            out = pipe(
                prompt=prompt,
                negative_prompt=negative if guidance > 1 else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=size and h,
                width=size and w,
                num_images_per_prompt=batch,
                latents=latents,
                output_type="np",
            ).images
        save_images(name, out)
        cases.append(case_entry(name, mask, sched, prompt, negative, steps, guidance, batch, h, w))
        cases[-1]["default_size"] = size is None
    return cases


def init_image():
    """A deterministic 32x32 test picture (gradients and a disc), written as
    bert_init.png for the Rust test."""
    y, x = np.mgrid[0:32, 0:32]
    r = (x * 8).astype(np.uint8)
    g = (y * 8).astype(np.uint8)
    b = np.where((x - 15) ** 2 + (y - 17) ** 2 < 50, 230, 40).astype(np.uint8)
    img = Image.fromarray(np.stack([r, g, b], axis=-1), "RGB")
    img.save(os.path.join(OUT, f"{PREFIX}init.png"))
    return img


def img2img(pipes):
    """img2img with AutoencoderTiny draws one N(0,1) tensor, the noise added
    to the init latents: feed it from a saved array."""
    img = init_image()
    cases = []
    for name, mask, sched, prompt, negative, steps, guidance, strength in IMG2IMG_CASES:
        i2i = StableDiffusionImg2ImgPipeline(**pipes[mask].components)
        i2i.set_progress_bar_config(disable=True)
        i2i.scheduler = SCHEDULERS[sched](SCHEDULER_CONFIG)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        noise = torch.randn((1, 4, 4, 4), generator=g)
        queue = [noise]

        def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
            t = queue.pop(0)
            assert tuple(shape) == tuple(t.shape), (shape, t.shape)
            return t.to(dtype=dtype or t.dtype)

        orig = diffusers_img2img.randn_tensor
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
            diffusers_img2img.randn_tensor = orig
        assert not queue, "img2img did not draw the saved noise"
        np.save(os.path.join(OUT, f"{PREFIX}{name}.noise.npy"), noise.numpy())
        save_images(name, out)
        cases.append(case_entry(name, mask, sched, prompt, negative, steps, guidance, 1, 32, 32, strength))
    return cases


def main():
    for f in os.listdir(OUT):
        if f.startswith(PREFIX):
            os.remove(os.path.join(OUT, f))
    build()
    masked = load(MODEL)
    check_tokenizer(masked)
    with tempfile.TemporaryDirectory() as tmp:
        nomask_dir = os.path.join(tmp, "tiny-bert-taesd-nomask")
        shutil.copytree(MODEL, nomask_dir)
        path = os.path.join(nomask_dir, "text_encoder", "config.json")
        with open(path) as f:
            te_config = json.load(f)
        te_config["use_attention_mask"] = False
        write_json(path, te_config)
        unmasked = load(nomask_dir)
        sentence_dir = os.path.join(tmp, "tiny-bert-taesd-sentence")
        shutil.copytree(MODEL, sentence_dir)
        shutil.rmtree(os.path.join(sentence_dir, "unet"))
        shutil.copytree(os.path.join(SENTENCE_UNET, "unet"), os.path.join(sentence_dir, "unet"))
        sentence = load(sentence_dir)
        assert sentence.unet.config.class_embed_type == "projection"
        pipes = {True: masked, False: unmasked, "sentence": sentence}
        index = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "cases": txt2img(pipes),
            "img2img_cases": img2img(pipes),
        }
    write_json(os.path.join(OUT, f"{PREFIX}cases.json"), index)
    print("wrote", MODEL, "and", os.path.join(OUT, f"{PREFIX}*"))


if __name__ == "__main__":
    main()

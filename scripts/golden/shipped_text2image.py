"""Reference outputs of diffusers on ensueno's shipped text-to-image model.

Loads models/emoji-text2image with diffusers' own StableDiffusionPipeline
(BertModel text encoder, AutoencoderTiny VAE, DPMSolverMultistepScheduler:
exactly the classes model_index.json names), which also proves that diffusers
loads the folder as it is. Then, for a few prompts, generates from fixed
initial latents and saves the latents (the `--latents` input of
`ensueno generate`) and diffusers' float images for
crates/ensueno/tests/shipped_models.rs.

When the UNet has a class embedding (`class_embed_type: "projection"`, as
Stable unCLIP's), ensueno feeds it the prompt's sentence embedding: the
encoder's token states averaged over the real tokens and L2-normalised
(sentence-transformers' Pooling(mean) + Normalize), times sqrt(D) so that
its entries have unit variance. StableDiffusionPipeline
has no argument for class labels, so this script hands them to the UNet's
forward, in the pipeline's [negative, positive] batch order; everything else
is diffusers' own code.

When the model's prompting.json sets `sentence_token`, the UNet
cross-attends to one more token after the encoder's hidden states: their
mean over the real tokens (the sentence embedding before normalisation).
The script builds those states itself and hands them to the pipeline as
`prompt_embeds` / `negative_prompt_embeds`, diffusers' own arguments for
precomputed text conditioning.

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/shipped_text2image.py [MODEL_DIR]
Outputs go to crates/ensueno/tests/fixtures/shipped/emoji_*.
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join("models", "emoji-text2image")
OUT = os.path.join("crates", "ensueno", "tests", "fixtures", "shipped")

torch.set_num_threads(2)

CASES = [
    # name, prompt, negative prompt, scheduler, steps, guidance
    ("emoji_dpm2m", "elephant, noto style", "", "dpm++2m", 20, 4.0),
    ("emoji_euler", "red apple, twemoji style", "", "euler", 12, 4.0),
    ("emoji_ddim_empty", "", "", "ddim", 10, 1.0),
    ("emoji_dpm2m_paraphrase", "a pachyderm", "blue", "dpm++2m", 15, 5.0),
]


def hidden_and_mean(pipe, text):
    """The encoder's hidden states [1, T, D] and their mean over the real
    tokens [1, D] (sentence-transformers' Pooling(mean))."""
    tok = pipe.tokenizer(
        [text],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
    mask = tok.attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return hidden, pooled


def class_labels(pipe, text):
    """The prompt's class labels [1, D], as ensueno computes them."""
    hidden, pooled = hidden_and_mean(pipe, text)
    return torch.nn.functional.normalize(pooled, dim=-1) * hidden.shape[-1] ** 0.5


def with_sentence_token(pipe, text):
    """The hidden states with the sentence token appended, [1, T + 1, D]."""
    hidden, pooled = hidden_and_mean(pipe, text)
    return torch.cat([hidden, pooled.unsqueeze(1)], dim=1)


def feed_class_labels(pipe, prompt, negative, guidance):
    """Makes the pipeline's UNet calls carry the prompt's class labels."""
    labels = class_labels(pipe, prompt)
    if guidance > 1.0:
        labels = torch.cat([class_labels(pipe, negative), labels])
    forward = type(pipe.unet).forward.__get__(pipe.unet)

    def with_labels(sample, timestep, encoder_hidden_states, *args, **kwargs):
        kwargs["class_labels"] = labels
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    pipe.unet.forward = with_labels


def main():
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    assert type(pipe.text_encoder).__name__ == "BertModel", type(pipe.text_encoder)
    assert type(pipe.vae).__name__ == "AutoencoderTiny", type(pipe.vae)
    assert type(pipe.tokenizer).__name__ in ("BertTokenizerFast", "BertTokenizer"), type(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    default_scheduler = pipe.scheduler
    prompting_path = os.path.join(MODEL, "prompting.json")
    sentence_token = False
    if os.path.exists(prompting_path):
        with open(prompting_path) as f:
            sentence_token = json.load(f).get("sentence_token", False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    index = []
    for i, (name, prompt, negative, scheduler, steps, guidance) in enumerate(CASES):
        if scheduler == "dpm++2m":
            pipe.scheduler = default_scheduler
        elif scheduler == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(default_scheduler.config)
        elif scheduler == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(default_scheduler.config)
        g = torch.Generator().manual_seed(100 + i)
        latents = torch.randn((1, 4, size // 8, size // 8), generator=g)
        np.save(os.path.join(OUT, f"{name}.latents.npy"), latents.numpy())
        if pipe.unet.config.class_embed_type == "projection":
            feed_class_labels(pipe, prompt, negative, guidance)
        if sentence_token:
            text = dict(prompt_embeds=with_sentence_token(pipe, prompt),
                        negative_prompt_embeds=with_sentence_token(pipe, negative))
        else:
            text = dict(prompt=prompt, negative_prompt=negative)
        out = pipe(
            **text,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.clone(),
            height=size,
            width=size,
            output_type="np",
        ).images
        image = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().float()
        save_file({"image": image}, os.path.join(OUT, f"{name}.expected.safetensors"))
        index.append(dict(name=name, prompt=prompt, negative_prompt=negative,
                          scheduler=scheduler, steps=steps, guidance_scale=guidance))
        print(name, "image mean", float(image.mean()))
    with open(os.path.join(OUT, "emoji_cases.json"), "w") as f:
        json.dump(dict(cases=index, sentence_token=sentence_token,
                       torch=torch.__version__, diffusers=diffusers.__version__,
                       transformers=transformers.__version__), f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()

"""Does a text-to-image model with a sentence-embedding class embedding draw
from the embedding alone? Generates, with diffusers and four seeds, one row
per (token text, sentence text) pair: the UNet cross-attends to the token
states of the first and gets the class labels (scaled sentence embedding,
as ensueno computes them) of the second. Rows whose token text is empty show
what the sentence embedding carries by itself.

    /root/venvs/ensueno/bin/python scripts/analysis/sentence_probe.py MODEL_DIR OUT.png
"""
import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

ROWS = [
    ("a pachyderm", "a pachyderm"),
    ("", "a pachyderm"),
    ("", "elephant"),
    ("elephant", "elephant"),
    ("a spaceship launching", "a spaceship launching"),
    ("", "a spaceship launching"),
    ("", "rocket"),
]


def main():
    model, out = sys.argv[1:3]
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer

    def encode(text):
        t = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = pipe.text_encoder(t.input_ids, attention_mask=t.attention_mask)[0]
        mask = t.attention_mask.unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return hidden, torch.nn.functional.normalize(pooled, dim=-1) * hidden.shape[-1] ** 0.5

    forward = type(pipe.unet).forward.__get__(pipe.unet)
    empty_tokens, empty_labels = encode("")
    rows = []
    for token_text, sentence_text in ROWS:
        tokens, _ = encode(token_text)
        labels = torch.cat([empty_labels, encode(sentence_text)[1]])

        def with_labels(*args, labels=labels, **kwargs):
            kwargs["class_labels"] = labels
            return forward(*args, **kwargs)

        pipe.unet.forward = with_labels
        images = []
        for seed in range(4):
            image = pipe(
                prompt_embeds=tokens,
                negative_prompt_embeds=empty_tokens,
                num_inference_steps=20,
                guidance_scale=4.0,
                generator=torch.Generator().manual_seed(seed),
                height=64,
                width=64,
            ).images[0]
            images.append(np.array(image))
        rows.append(np.concatenate(images, 1))
    Image.fromarray(np.concatenate(rows, 0)).save(out)
    print("wrote", out)


if __name__ == "__main__":
    main()

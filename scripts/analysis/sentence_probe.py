"""Does a text-to-image model conditioned on the sentence embedding draw
from the embedding alone? Generates, with diffusers and four seeds, one row
per (token text, sentence text) pair: the UNet cross-attends to the token
states of the first and gets the sentence embedding of the second, as
ensueno feeds it: as class labels (scaled unit sentence embedding) when the
UNet has a class embedding, and as the extra last token (the mean token
state) when the model's prompting.json sets `sentence_token`. Rows whose
token text is empty show what the sentence embedding carries by itself.

    /root/venvs/ensueno/bin/python scripts/analysis/sentence_probe.py MODEL_DIR OUT.png
"""
import json
import os
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

    prompting = os.path.join(model, "prompting.json")
    sentence_token = os.path.exists(prompting) and json.load(open(prompting)).get("sentence_token", False)
    class_embedding = pipe.unet.config.class_embed_type == "projection"

    def encode(text):
        t = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = pipe.text_encoder(t.input_ids, attention_mask=t.attention_mask)[0]
        mask = t.attention_mask.unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return hidden, pooled

    def labels_of(pooled):
        return torch.nn.functional.normalize(pooled, dim=-1) * pooled.shape[-1] ** 0.5

    forward = type(pipe.unet).forward.__get__(pipe.unet)
    empty_tokens, empty_pooled = encode("")
    if sentence_token:
        empty_tokens = torch.cat([empty_tokens, empty_pooled.unsqueeze(1)], 1)
    rows = []
    for token_text, sentence_text in ROWS:
        tokens, _ = encode(token_text)
        _, pooled = encode(sentence_text)
        if sentence_token:
            tokens = torch.cat([tokens, pooled.unsqueeze(1)], 1)
        if class_embedding:
            labels = torch.cat([labels_of(empty_pooled), labels_of(pooled)])

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

"""Loads a CLIP trained by `ensueno train clip` with transformers alone
(CLIPModel, CLIPTokenizer, CLIPImageProcessor from the folder) and scores
the zero-shot retrieval of every training caption among all images of its
style, as the trainer does after its last epoch (zero_shot/epoch-NNN.json),
so the two can be compared: same figures, computed by transformers from the
saved folder.

    /root/venvs/ensueno/bin/python scripts/analysis/clip_transformers_check.py \
        RUN/model ../shared/data/emoji RUN/zero_shot/epoch-024.json

The emoji are composited on the recipe's background (white) first, as
ensueno's loader does; the image processor then resizes (a no-op at 64x64),
crops and normalises them.
"""
import io
import json
import os
import sys
import tarfile

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer


def features(out):
    """transformers 5's get_*_features return an output whose pooler_output
    is the projected embedding; 4.x returned the tensor itself."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_style(tar_path, background):
    items = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.rpartition("/")[-1].partition(".")
            data = tar.extractfile(m).read() if m.isfile() else None
            if data is None:
                continue
            items.setdefault(key, {})[ext] = data
    keys = sorted(k for k, v in items.items() if "png" in v and "txt" in v)
    images, captions = [], []
    for k in keys:
        rgba = Image.open(io.BytesIO(items[k]["png"])).convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        images.append(Image.alpha_composite(canvas, rgba).convert("RGB"))
        captions.append(items[k]["txt"].decode().strip())
    return keys, images, captions


def main():
    model_dir, data_dir, reference = sys.argv[1:4]
    torch.set_num_threads(2)
    model = CLIPModel.from_pretrained(model_dir).eval()
    tok = CLIPTokenizer.from_pretrained(model_dir)
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    recipe = json.load(open(os.path.join(model_dir, "clip_training.json")))
    ours = {(s["direction"], s["style"]): s for s in json.load(open(reference))}
    for tar_name in sorted(os.listdir(data_dir)):
        if not tar_name.endswith(".tar"):
            continue
        style = tar_name[: -len(".tar")].rsplit("-", 1)[0].lower()
        _, images, captions = load_style(os.path.join(data_dir, tar_name), recipe["background"])
        with torch.no_grad():
            img = torch.cat([
                features(model.get_image_features(**proc(images=images[i : i + 256], return_tensors="pt")))
                for i in range(0, len(images), 256)
            ])
            prompts = [recipe["style_template"].replace("{caption}", c).replace("{style}", style) for c in captions]

            def embed(texts):
                out = []
                for i in range(0, len(texts), 256):
                    t = tok(texts[i : i + 256], padding=True, truncation=True,
                            max_length=recipe["max_text_tokens"], return_tensors="pt")
                    out.append(features(model.get_text_features(**t)))
                return torch.cat(out)

            txt = embed(prompts)
            plain = embed(captions)
        for name, q, g in [("text_to_image", txt, img), ("image_to_text", img, plain)]:
            q = torch.nn.functional.normalize(q, dim=-1)
            g = torch.nn.functional.normalize(g, dim=-1)
            sims = q @ g.T
            ranks = (sims > sims.diagonal()[:, None]).sum(1).numpy()
            top1, top5 = float(np.mean(ranks == 0)), float(np.mean(ranks < 5))
            ref = ours.get((name, style))
            ref_txt = f" | ensueno: top-1 {100 * ref['top1']:.1f}% top-5 {100 * ref['top5']:.1f}%" if ref else ""
            print(f"transformers {name:>13} | {style:>8} | n {len(ranks)} | top-1 {100 * top1:.1f}% | "
                  f"top-5 {100 * top5:.1f}% | median rank {int(np.median(ranks))}{ref_txt}")


if __name__ == "__main__":
    main()

"""How well the text encoder's sentence embedding alone recognises the
paraphrases of an `ensueno eval text2image` run: for each paraphrase, the
rank of the named emoji's caption among all captions of one style by cosine
similarity of all-MiniLM-L6-v2 sentence embeddings (mean of the token states
over the real tokens, L2-normalised, prompts cut at 32 tokens as the model
does). A ceiling for what conditioning on that embedding could carry.

    /root/venvs/ensueno/bin/python scripts/analysis/paraphrase_sentence_retrieval.py \
        EVAL.json ../shared/data/emoji/noto-64.tar ../shared/weights/all-MiniLM-L6-v2
"""
import json
import sys
import tarfile

import torch
from transformers import AutoModel, AutoTokenizer


def main():
    eval_json, tar_path, encoder = sys.argv[1:4]
    style = "noto" if "noto" in tar_path else "twemoji"
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(encoder)
    model = AutoModel.from_pretrained(encoder).eval()
    captions = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".txt"):
                key = member.name.rsplit("/", 1)[-1][: -len(".txt")]
                captions[key] = tar.extractfile(member).read().decode().strip()
    keys = sorted(captions)

    def embed(texts):
        out = []
        for i in range(0, len(texts), 256):
            batch = tok(texts[i : i + 256], padding=True, truncation=True, max_length=32, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    cases = [c["case"] for c in json.load(open(eval_json))["cases"]]
    cases = [c for c in cases if c["kind"] == "paraphrase" and c["style"] == style]
    sims = embed([c["text"] for c in cases]) @ embed([captions[k] for k in keys]).T
    ranks = []
    for row, case in zip(sims, cases):
        target = keys.index(case["key"])
        ranks.append(int((row > row[target]).sum()))
        print(ranks[-1], case["text"], "->", captions[keys[int(row.argmax())]])
    n = len(ranks)
    print(f"{style}: {n} paraphrases, caption top-1 {sum(r < 1 for r in ranks)}/{n}, top-5 {sum(r < 5 for r in ranks)}/{n}")


if __name__ == "__main__":
    main()

"""Golden fixtures for ensueno's CLIP text encoder and CLIP tokenizer.

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/clip.py

Writes
  crates/ensueno/tests/fixtures/clip/<variant>/{config.json,model.safetensors,io.safetensors}
      tiny random transformers CLIPTextModels (quick_gelu in the Stable Diffusion
      `text_model.`-prefixed layout, gelu in transformers 5's root layout) with
      input ids, last_hidden_state and the diffusers clip_skip=1,2 outputs.
  crates/ensueno/tests/fixtures/clip_tokenizer/{vocab.json,merges.txt,LICENSE-openai-CLIP,golden.json}
      the real CLIP BPE files and ids from transformers' CLIPTokenizer.
  crates/ensueno/tests/fixtures/tiny_clip_tokenizer/{vocab.json,merges.txt,special_tokens_map.json,golden.json}
      a ~1000-token CLIP-style BPE tokenizer for tiny pipelines and its golden ids.
"""

import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures")
SHARED = os.environ.get("ENSUENO_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
if not os.path.isdir(os.path.join(SHARED, "tokenizers")):
    SHARED = "/work/shared"

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "numpy": np.__version__,
}


def text_model_variant(name, hidden_act, layers, sd_layout, seed):
    out = os.path.join(FIX, "clip", name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=16,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    model = CLIPTextModel(config).eval()
    # Default init leaves LayerNorms at identity and biases at zero: randomise
    # everything so every tensor is exercised.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n and n.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias") or "layer_norm" in n:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    if sd_layout:
        # Stable Diffusion repos (transformers 4.x) prefix every key with `text_model.`.
        path = os.path.join(out, "model.safetensors")
        tensors = load_file(path)
        save_file({"text_model." + k: v.contiguous() for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})

    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    ids[:, 0] = 998
    ids[0, 10:] = 999
    with torch.no_grad():
        o = model(ids, output_hidden_states=True)
        hs = o.hidden_states
        assert len(hs) == layers + 1
        ln = model.final_layer_norm
        tensors = {
            "input_ids": ids.to(torch.int64),
            "last_hidden_state": o.last_hidden_state.float().contiguous(),
            # diffusers encode_prompt: hidden_states[-(clip_skip + 1)] -> final_layer_norm
            "clip_skip_1": ln(hs[-2]).float().contiguous(),
            "clip_skip_2": ln(hs[-3]).float().contiguous(),
        }
    save_file(tensors, os.path.join(out, "io.safetensors"), metadata={k: v for k, v in VERSIONS.items()})
    print(f"wrote {out}: {sorted(os.listdir(out))}")


def main():
    text_model_variant("quick_gelu", "quick_gelu", 3, True, 0)
    text_model_variant("gelu", "gelu", 2, False, 10)
    real_tokenizer()
    tiny_tokenizer()


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

LONG_PROMPT = " ".join(
    ["a", "majestic", "castle", "on", "a", "hill", "at", "sunset,", "highly", "detailed", "painting"] * 19
)[: 10**6]  # 209 words: far beyond 77 tokens

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT",
    "HELLO WORLD",
    "a cat, a dog; and a bird!",
    "portrait of a woman... (oil on canvas) [masterpiece] {best quality}",
    "don't stop, it's what we'd've done, I'm sure you'll see",
    "THEY'RE here and WE'VE gone",
    "1234567890 and 3.14159 and 2024-01-01",
    "  lots   of\twhite\n\nspace  ",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",
    "cafe\u0301 (decomposed accent)",
    "un perro corriendo en la playa al atardecer, ma\u00f1ana",
    "\u00bfd\u00f3nde est\u00e1 el ni\u00f1o?",
    "\u5bcc\u58eb\u5c71\u3068\u685c\u306e\u98a8\u666f",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
    "\u30ab\u30bf\u30ab\u30ca \u30c6\u30b9\u30c8",
    "a happy dog \U0001f415\U0001f389 with a party hat \U0001f973",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 family emoji and \u2764\ufe0f",
    "",
    "   ",
    "a",
    "hyper-realistic, 8k, unreal-engine, trending on artstation",
    "email me at someone@example.com or visit https://example.com/path?x=1",
    "#hashtag @mention $100 50% off & more",
    "\u00c9COLE \u00c0 PARIS \u00d1AND\u00da",
    "\u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439 \u043c\u0438\u0440 and \u03b1\u03b2\u03b3",
    "mixedCASE wordsAndNumbers123abc",
    "a photo <|endoftext|> of <|startoftext|> text",
    "quotes \"double\" and 'single' and `back`",
    LONG_PROMPT,
]

TINY_PROMPTS = [
    "a photo of a cat",
    "the red apple on the table",
    "Hello, World! 123",
    "waving hand sign, medium skin tone",
    "",
    "\u00e9l\u00e9phant \U0001f418",
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(
        range(ord("\u00ae"), ord("\u00ff") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class OriginalClipBpe:
    """OpenAI's simple_tokenizer algorithm (without ftfy, which is not installed),
    used only to cross-check transformers' tokenizer."""

    def __init__(self, vocab, merges):
        import regex

        self.vocab = vocab
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text):
        import html
        import re
        import unicodedata

        text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)).strip())
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for tok in self.pat.findall(text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.vocab[t] for t in self.bpe(tok))
        return ids


def load_merges(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [l for l in lines[1:] if l]


def tokenizer_golden(tok_dir, prompts, extra_pads, original):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tok_dir)
    cases = []
    disagreements = []
    for text in prompts:
        raw = tok(text, add_special_tokens=False).input_ids
        longest = tok(text).input_ids
        case = {
            "text": text,
            "ids": raw,
            "truncated": len(longest) > 77,
            "padded": {},
            "ids_with_pad": {},
        }
        for pad in extra_pads:
            # The pad token becomes a special token: with pad "!" (SD 2.x) a "!"
            # in the prompt encodes as the special "!" (id 0), not "!</w>".
            t = CLIPTokenizer.from_pretrained(tok_dir, pad_token=pad)
            enc = t(text, padding="max_length", max_length=77, truncation=True).input_ids
            assert len(enc) == 77
            case["padded"][pad] = enc
            case["ids_with_pad"][pad] = t(text, add_special_tokens=False).input_ids
            case["truncated_with_pad"] = case.get("truncated_with_pad", {})
            case["truncated_with_pad"][pad] = len(t(text).input_ids) > 77
        if original is not None and original.encode(text) != raw:
            disagreements.append(text)
        cases.append(case)
    return tok, cases, disagreements


def real_tokenizer():
    out = os.path.join(FIX, "clip_tokenizer")
    os.makedirs(out, exist_ok=True)
    src = os.path.join(SHARED, "tokenizers", "clip")
    for name in ["vocab.json", "merges.txt", "LICENSE-openai-CLIP"]:
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    original = OriginalClipBpe(vocab, load_merges(os.path.join(out, "merges.txt")))
    tok, cases, disagreements = tokenizer_golden(out, PROMPTS, ["<|endoftext|>", "!"], original)
    golden = {
        "reference": f"transformers {transformers.__version__} CLIPTokenizer ({type(tok).__name__})",
        "cross_check": "OpenAI simple_tokenizer algorithm without ftfy; prompts where it differs are listed",
        "original_disagrees_on": disagreements,
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "cases": cases,
    }
    with open(os.path.join(out, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
    print(f"wrote {out}: {len(cases)} prompts; original algorithm disagrees on {disagreements}")


def tiny_tokenizer(n_merges=486):
    """The real CLIP vocabulary cut to its first 512 byte symbols plus the
    first `n_merges` merges; CLIP's vocab.json lists merge results in merge
    order, so every kept token keeps its real id, and the specials come last."""
    out = os.path.join(FIX, "tiny_clip_tokenizer")
    os.makedirs(out, exist_ok=True)
    src = os.path.join(SHARED, "tokenizers", "clip")
    with open(os.path.join(src, "vocab.json"), encoding="utf-8") as f:
        real = json.load(f)
    by_id = {i: t for t, i in real.items()}
    merges = load_merges(os.path.join(src, "merges.txt"))[:n_merges]
    vocab = {by_id[i]: i for i in range(512)}
    for k, m in enumerate(merges):
        joined = m.replace(" ", "")
        assert real[joined] == 512 + k, (m, real[joined])
        vocab[joined] = 512 + k
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=1)
    original = OriginalClipBpe(vocab, merges)
    tok, cases, disagreements = tokenizer_golden(out, TINY_PROMPTS, ["<|endoftext|>"], original)
    assert len(tok) == len(vocab) == 1000, len(tok)
    golden = {
        "reference": f"transformers {transformers.__version__} CLIPTokenizer ({type(tok).__name__})",
        "original_disagrees_on": disagreements,
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "cases": cases,
    }
    with open(os.path.join(out, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
    # The same tokenizer as transformers serialises it (tokenizer.json), to test
    # that loading path; kept beside the real tokenizer's fixtures.
    tok.backend_tokenizer.save(os.path.join(FIX, "clip_tokenizer", "tiny_tokenizer.json"))
    print(f"wrote {out}: vocab {len(vocab)}; original algorithm disagrees on {disagreements}")


if __name__ == "__main__":
    main()

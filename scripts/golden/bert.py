"""Golden fixtures for ensueno's BERT (`BertModel`) and MiniLM sentence encoder.

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/bert.py

Writes
  crates/ensueno/tests/fixtures/bert/tiny/
      a tiny random transformers `BertModel` (hidden 32, 2 layers, 4 heads,
      vocab 1000) saved with save_pretrained, a tiny WordPiece `tokenizer.json`
      and the sentence-transformers files (modules.json, 1_Pooling/config.json,
      sentence_bert_config.json with max_seq_length 16), so the folder is a
      complete tiny sentence encoder;
      io.safetensors: hand-made input ids / token types / attention masks with
      padding, last_hidden_state (with and without token_type_ids) and, for the
      tokenizer, reference ids, masks, hidden states and sentence vectors of
      TINY_SENTENCES.
  crates/ensueno/tests/fixtures/bert/minilm.safetensors
      the real all-MiniLM-L6-v2 (from $ENSUENO_SHARED or /work/shared) on
      MINILM_SENTENCES: the tokenizer's ids and mask, the first 5 and last 4
      positions of last_hidden_state (the full tensor would be ~4 MB) and the
      sentence vectors, computed in f32 (the f16 weights are loaded as f32).

Mean pooling and normalisation are done by hand (sentence-transformers is not
installed): sum(h * mask) / max(sum(mask), 1e-9), then x / max(|x|_2, 1e-12),
as `sentence_transformers.models.Pooling` (mean) and `Normalize` do. The
tokenizer is called as sentence-transformers' `Transformer.tokenize` does:
padding to the longest, truncation "longest_first" at max_seq_length.
Attention is transformers' "eager" implementation (additive mask of finfo.min
on padded keys).
"""

import json
import os
import shutil

import numpy as np
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures", "bert")
SHARED = os.environ.get("ENSUENO_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
if not os.path.isdir(os.path.join(SHARED, "weights")):
    SHARED = "/work/shared"
MINILM = os.path.join(SHARED, "weights", "all-MiniLM-L6-v2")

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "numpy": np.__version__,
}

LONG = " ".join(
    (
        "the quick brown fox jumps over the lazy dog while an elephant "
        "watches from the shade of a tall tree near the river"
    ).split()
    * 14
)  # 308 words, more than 256 tokens
assert len(LONG.split()) >= 300

MINILM_SENTENCES = [
    "an elephant",
    "a pachyderm",
    "a red apple",
    "a smiling face",
    "grinning face",
    "a sneaker",
    "",
    LONG,
    "\U0001f418\U0001f34e",
    "\u8c61",
]

TINY_SENTENCES = [
    "an elephant",
    "A Smiling FACE!",
    "",
    "the quick brown fox jumps over the lazy dog and the elephant and a red apple",  # > 16 tokens
    "\U0001f418 \u8c61 caf\u00e9",
]


def single_key_metadata(meta):
    # safetensors writes metadata keys in hash order; one key keeps the
    # fixture bytes identical from run to run.
    return {"reference": json.dumps(meta, sort_keys=True)}


def mean_pool_normalize(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    counts = m.sum(1).clamp(min=1e-9)
    pooled = summed / counts
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def tiny_tokenizer(out):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = [
        "an", "a", "the", "elephant", "smiling", "face", "quick", "brown", "fox",
        "jumps", "over", "lazy", "dog", "and", "red", "apple", "grin", "##ning",
        "cafe", "\u8c61",
    ]
    vocab = specials + words + letters + ["##" + c for c in letters]
    vocab += list("0123456789") + list("!?.,;:'\"-()")
    vocab = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # The real MiniLM tokenizer.json pads to a fixed 128; the encoder must
    # override that, so the tiny one does the same.
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=24)
    tok.enable_truncation(max_length=24)
    tok.save(os.path.join(out, "tokenizer.json"))
    return PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(out, "tokenizer.json"),
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def write_sentence_transformers_files(out, max_seq_length):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    with open(os.path.join(out, "modules.json"), "w") as f:
        json.dump(modules, f, indent=2)
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
        json.dump(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            f,
            indent=2,
        )
    with open(os.path.join(out, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f, indent=2)


def tiny():
    out = os.path.join(FIX, "tiny")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = BertModel(config, add_pooling_layer=True).eval()
    # Default init leaves LayerNorms at identity and biases at zero: randomise
    # everything so every tensor is exercised.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n and n.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias") or "LayerNorm" in n:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.randint(0, 2, (3, 12), generator=g)
    with torch.no_grad():
        h_types = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        h_plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        h_nomask = model(input_ids=ids).last_hidden_state

    hf_tok = tiny_tokenizer(out)
    max_seq_length = 16
    write_sentence_transformers_files(out, max_seq_length)
    enc = hf_tok(
        TINY_SENTENCES, padding=True, truncation="longest_first",
        max_length=max_seq_length, return_tensors="pt",
    )
    with torch.no_grad():
        h_sent = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    vectors = mean_pool_normalize(h_sent, enc["attention_mask"])
    for s, row in zip(TINY_SENTENCES, enc["input_ids"].tolist()):
        print(f"  tiny tokens {s[:30]!r}: {hf_tok.convert_ids_to_tokens(row)}")

    tensors = {
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "token_type_ids": types.to(torch.int64),
        "last_hidden_state": h_types.float().contiguous(),
        "last_hidden_state_no_types": h_plain.float().contiguous(),
        "last_hidden_state_no_mask": h_nomask.float().contiguous(),
        "sentences_input_ids": enc["input_ids"].to(torch.int64),
        "sentences_attention_mask": enc["attention_mask"].to(torch.int64),
        "sentences_hidden": h_sent.float().contiguous(),
        "sentences_vectors": vectors.float().contiguous(),
    }
    meta = dict(VERSIONS, sentences=TINY_SENTENCES)
    save_file(tensors, os.path.join(out, "io.safetensors"), metadata=single_key_metadata(meta))
    print(f"wrote {out}: {sorted(os.listdir(out))}")


def minilm():
    if not os.path.isdir(MINILM):
        print(f"skipped MiniLM: {MINILM} not found (set ENSUENO_SHARED)")
        return
    hf_tok = PreTrainedTokenizerFast.from_pretrained(MINILM)
    with open(os.path.join(MINILM, "sentence_bert_config.json")) as f:
        max_seq_length = json.load(f)["max_seq_length"]
    model = BertModel.from_pretrained(
        MINILM, dtype=torch.float32, attn_implementation="eager", add_pooling_layer=False
    ).eval()
    assert next(model.parameters()).dtype == torch.float32
    enc = hf_tok(
        MINILM_SENTENCES, padding=True, truncation="longest_first",
        max_length=max_seq_length, return_tensors="pt",
    )
    with torch.no_grad():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    vectors = mean_pool_normalize(h, enc["attention_mask"])
    t = h.shape[1]
    print(f"  MiniLM batch: {tuple(h.shape)}; lengths {enc['attention_mask'].sum(1).tolist()}")
    for s, row in zip(MINILM_SENTENCES, enc["input_ids"].tolist()):
        if len(s) < 40:
            toks = [x for x in hf_tok.convert_ids_to_tokens(row) if x != "[PAD]"]
            print(f"  tokens {s!r}: {toks}")
    cos = vectors @ vectors.T
    idx = {s: i for i, s in enumerate(MINILM_SENTENCES)}
    for a, b in [
        ("an elephant", "a pachyderm"),
        ("an elephant", "a red apple"),
        ("a smiling face", "grinning face"),
        ("a smiling face", "a sneaker"),
    ]:
        print(f"  cos({a!r}, {b!r}) = {cos[idx[a], idx[b]].item():.4f}")
    tensors = {
        "input_ids": enc["input_ids"].to(torch.int64),
        "attention_mask": enc["attention_mask"].to(torch.int64),
        "hidden_head": h[:, :5].float().contiguous(),
        "hidden_tail": h[:, t - 4 :].float().contiguous(),
        "vectors": vectors.float().contiguous(),
    }
    meta = dict(VERSIONS, sentences=MINILM_SENTENCES, max_seq_length=max_seq_length)
    path = os.path.join(FIX, "minilm.safetensors")
    save_file(tensors, path, metadata=single_key_metadata(meta))
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    os.makedirs(FIX, exist_ok=True)
    tiny()
    minilm()


if __name__ == "__main__":
    main()

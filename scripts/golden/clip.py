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
import sys

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


if __name__ == "__main__":
    main()

"""Golden fixtures for ensueno's CLIPModel (both towers, projections,
contrastive loss and its gradients) against transformers' CLIPModel.

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/clip_model.py

Writes crates/ensueno/tests/fixtures/clip_model/{config.json,model.safetensors,io.safetensors}:
a tiny random transformers CLIPModel (text: quick_gelu, vision: gelu) saved
with save_pretrained, and
  input_ids, pixel_values                      the inputs (3 pairs)
  text_embeds, image_embeds                    get_text_features / get_image_features (not normalised)
  vision_last_hidden_state, vision_pooled      the vision tower's outputs
  text_pooled                                  the text tower's pooler_output
  logits_per_text, loss                        CLIPModel(..., return_loss=True)
  grad.<name>                                  d loss / d parameter, for a few parameters
  loss_grouped                                 the loss when pairs 0 and 2 share a caption (groups 0, 1, 0):
                                               cross-entropy with each row's positives weighted equally
                                               (torch.nn.functional.cross_entropy with probability targets)
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures", "clip_model")

GRAD_NAMES = [
    "logit_scale",
    "text_projection.weight",
    "visual_projection.weight",
    "text_model.embeddings.token_embedding.weight",
    "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_model.final_layer_norm.weight",
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.pre_layrnorm.bias",
    "vision_model.encoder.layers.1.mlp.fc2.weight",
    "vision_model.post_layernorm.weight",
]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=16,
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=999,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=30,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_channels=3,
            image_size=16,
            patch_size=4,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=16,
        ),
        projection_dim=16,
        logit_scale_init_value=2.0,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n == "logit_scale":
                p.fill_(2.0)
            elif ("layer_norm" in n or "layrnorm" in n or "layernorm" in n) and n.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias") or "layer_norm" in n or "layrnorm" in n or "layernorm" in n:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(OUT, safe_serialization=True)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 998, (3, 12), generator=g)
    ids[:, 0] = 998
    # End of text at different places, padded with the end-of-text id after it.
    for row, end in enumerate([5, 11, 8]):
        ids[row, end:] = 999
    pixels = torch.randn(3, 3, 16, 16, generator=g)

    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    out.loss.backward()
    params = dict(model.named_parameters())
    with torch.no_grad():
        text_out = model.text_model(input_ids=ids)
        vision_out = model.vision_model(pixel_values=pixels)
        text_embeds = model.text_projection(text_out.pooler_output)
        image_embeds = model.visual_projection(vision_out.pooler_output)
        logits = out.logits_per_text
        groups = torch.tensor([0, 1, 0])
        same = (groups[:, None] == groups[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss_grouped = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
    tensors = {
        "input_ids": ids.to(torch.int64),
        "pixel_values": pixels,
        "text_embeds": text_embeds,
        "image_embeds": image_embeds,
        "text_pooled": text_out.pooler_output,
        "vision_last_hidden_state": vision_out.last_hidden_state,
        "vision_pooled": vision_out.pooler_output,
        "logits_per_text": logits,
        "loss": out.loss.detach().reshape(1),
        "loss_grouped": loss_grouped.reshape(1),
    }
    for name in GRAD_NAMES:
        tensors["grad." + name] = params[name].grad.detach().reshape(-1 if name == "logit_scale" else params[name].shape)
    tensors = {k: v.float().contiguous() if v.dtype != torch.int64 else v for k, v in tensors.items()}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
    save_file(tensors, os.path.join(OUT, "io.safetensors"), metadata=versions)
    print(f"wrote {OUT}: {sorted(os.listdir(OUT))}; loss {out.loss.item():.6f}")


if __name__ == "__main__":
    main()

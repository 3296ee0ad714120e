"""Builds a tiny random transformers model, saves it as a Hugging Face directory
and records its logits on fixed token ids, for the Rust parity test.

usage: hf_reference.py OUT_DIR SPEC_JSON
SPEC_JSON: {"arch": "qwen2"|"qwen3"|"llama"|"mistral", "seed": int, "config": {...}, "ids": [[...], ...], "dtype": "float32"|"bfloat16"}
"""
import json
import sys

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

out, spec = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(spec["seed"])
cls = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}[spec["arch"]]
config = cls[0](**spec["config"])
model = cls[1](config).float().eval()
# Default init (std 0.02, unit norms, zero biases) hides loading mistakes; use
# larger, distinct values everywhere so every tensor matters.
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.15)
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.get("dtype", "float32")]
model = model.to(dtype)
ids = torch.tensor(spec["ids"], dtype=torch.long)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float()
model.save_pretrained(out, safe_serialization=True)
with open(f"{out}/logits.json", "w") as f:
    json.dump({"shape": list(logits.shape), "logits": logits.flatten().tolist()}, f)

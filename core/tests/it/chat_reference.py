"""What transformers makes of a tokenizer directory, for the Rust chat-template tests.

usage: chat_reference.py < REQUEST_JSON
REQUEST_JSON: {"dir": str, "chats": [{"messages": [...], "add_generation_prompt": bool, "vars": {...}}],
               "prompts": [str]}
prints: {"rendered": [str], "chat_ids": [[int]], "prompt_ids": [[int]], "eos_token_id": int | [int] | null}
"""
import json
import sys

from transformers import AutoTokenizer, GenerationConfig

req = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(req["dir"])
out = {"rendered": [], "chat_ids": [], "prompt_ids": []}
for chat in req["chats"]:
    kw = dict(add_generation_prompt=chat["add_generation_prompt"], **chat.get("vars", {}))
    out["rendered"].append(tok.apply_chat_template(chat["messages"], tokenize=False, **kw))
    ids = tok.apply_chat_template(chat["messages"], tokenize=True, **kw)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    out["chat_ids"].append(list(ids))
for text in req["prompts"]:
    out["prompt_ids"].append(tok(text)["input_ids"])
try:
    out["eos_token_id"] = GenerationConfig.from_pretrained(req["dir"]).eos_token_id
except OSError:
    out["eos_token_id"] = None
print(json.dumps(out))

"""PyTorch / transformers baseline for the throughput bench: the same model
directory, batch and lengths as the sluice measurement.

usage: hf_baseline.py MODEL_DIR BATCH PROMPT_LEN NEW_TOKENS ITERS THREADS DEVICE [DTYPE]
prints one JSON line: {"generation_tokens_per_s": .., "train_tokens_per_s": ..}; a figure
is null when that part ran out of device memory (the plain loop holds [B, T, V] logits).
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, batch, plen, new, iters, threads, device = sys.argv[1:8]
dtype = torch.bfloat16 if sys.argv[8:9] == ["bf16"] else torch.float32
batch, plen, new, iters, threads = int(batch), int(plen), int(new), int(iters), int(threads)
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
vocab = model.config.vocab_size
prompt = torch.randint(3, vocab, (batch, plen), device=device)


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gen():
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                       top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)


def timed(fn, tokens):
    """Tokens/s of `iters` calls after one warm-up call; None when out of memory."""
    try:
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return tokens * iters / (time.perf_counter() - t)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


gen_tps = timed(gen, batch * new)

model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
seq = torch.randint(3, vocab, (batch, plen + new), device=device)


def train_step():
    logits = model(input_ids=seq[:, :-1]).logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:].unsqueeze(-1)).squeeze(-1)
    loss = -logp.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


train_tps = timed(train_step, batch * (plen + new - 1))
print(json.dumps({"generation_tokens_per_s": gen_tps, "train_tokens_per_s": train_tps}))

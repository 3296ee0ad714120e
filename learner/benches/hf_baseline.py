"""PyTorch / transformers baseline for the throughput bench: the same model
directory, batch and lengths as the sluice measurement.

usage: hf_baseline.py MODEL_DIR BATCH PROMPT_LEN NEW_TOKENS ITERS THREADS DEVICE
prints one JSON line: {"generation_tokens_per_s": .., "train_tokens_per_s": ..}
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, batch, plen, new, iters, threads, device = sys.argv[1:8]
batch, plen, new, iters, threads = int(batch), int(plen), int(new), int(iters), int(threads)
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
vocab = model.config.vocab_size
prompt = torch.randint(3, vocab, (batch, plen), device=device)


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gen():
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                       top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)


gen()  # warm-up
sync()
t = time.perf_counter()
for _ in range(iters):
    gen()
sync()
gen_tps = batch * new * iters / (time.perf_counter() - t)

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


train_step()
sync()
t = time.perf_counter()
for _ in range(iters):
    train_step()
sync()
train_tps = batch * (plen + new - 1) * iters / (time.perf_counter() - t)
print(json.dumps({"generation_tokens_per_s": gen_tps, "train_tokens_per_s": train_tps}))

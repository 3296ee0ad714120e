#!/usr/bin/env bash
# GPU checks for a machine with PyTorch 2.11.0+cu130 and no Rust toolchain.
#
#   ./scripts/gpu-check.sh prepare   # here: copy stripped binaries to gpu/ (ignored; carry it)
#   ./scripts/gpu-check.sh run       # on the GPU machine, from the repository root
#
# `run` does, in one go (about 5-8 minutes on one H100), writing logs and one JSON
# report, report.json, under $OUT (or gpu/out):
# 1. Hugging Face parity on CUDA: the model's parity tests with sluice's side on
#    the GPU (SLUICE_TEST_DEVICE=cuda), fp32 families within 1e-4 of transformers
#    on the CPU, bf16 within 0.1;
# 2. the NCCL unit tests of sluice-collective: they skip (and say so) without CUDA;
#    on one GPU they check a one-rank communicator on real CUDA tensors and that only
#    one NCCL library is loaded; on two or more GPUs also a two-rank all-reduce and
#    broadcast whose ranks hold different values, and the weights broadcast group
#    (learner root on cuda:0, an actor member on cuda:1, bf16 bit-exact); on one GPU
#    the two-rank tests print SKIPPED (NCCL refuses two ranks on one device);
# 3. `sluice train examples/arithmetic.toml` for 100 GRPO steps on CUDA in f32 and
#    in bf16, and on the CPU in f32 with the same binary (the learning curves);
# 4. the throughput benchmark (generation and train tokens/s against transformers
#    `generate` / the plain PyTorch loop on the same GPU) at Qwen2.5-0.5B shapes with
#    its real 151,936-token vocabulary, bf16, batch 64 and 256 (batch 256 with
#    activation checkpointing; a baseline that runs out of memory is reported so).
# A step that fails is recorded in the report and the later steps still run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  prepare)
    source scripts/env.sh
    cargo build --workspace --all-targets
    # The executable cargo built for target $1 (the other arguments select it).
    exe() { local name=$1; shift; cargo test "$@" --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys; n=sys.argv[1]; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == n][-1])' "$name"; }
    mkdir -p gpu
    objcopy --strip-all "$(exe sluice_collective -p sluice-collective --lib)" gpu/collective-unit-tests
    objcopy --strip-all "$(exe throughput -p sluice-learner --bench throughput)" gpu/throughput
    objcopy --strip-all "$(exe hf_parity -p sluice-model --test hf_parity)" gpu/hf-parity
    objcopy --strip-all target/debug/sluice gpu/sluice
    for b in gpu/*; do ldd "$b" | grep -q libtorch_cuda || { echo "$b does not link libtorch_cuda" >&2; exit 1; }; done
    ls -la gpu
    ;;
  run)
    out="${OUT:-gpu/out}"; mkdir -p "$out"
    TORCH_LIB=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
    export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SLUICE_PYTHON=python3
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
    status() { echo "$1 $2" >> "$out/status.txt"; }
    : > "$out/status.txt"
    echo "== 1. HF parity on CUDA (fp32, bf16)"
    if SLUICE_TEST_DEVICE=cuda ./gpu/hf-parity --nocapture --test-threads 1 > "$out/parity.log" 2>&1; then status parity ok; else status parity failed; fi
    grep -E '^parity|test result' "$out/parity.log" || tail -20 "$out/parity.log"
    echo "== 2. NCCL"
    if ./gpu/collective-unit-tests nccl --nocapture --test-threads 1 > "$out/nccl.log" 2>&1; then status nccl ok; else status nccl failed; fi
    grep -E 'SKIPPED|test |test result' "$out/nccl.log" || tail -20 "$out/nccl.log"
    echo "== 3. sluice train on CUDA (f32, bf16) and CPU (f32)"
    for run in cuda-f32:cuda:f32 cuda-bf16:cuda:bf16 cpu-f32:cpu:f32; do
      IFS=: read -r name device dtype <<<"$run"
      start=$(date +%s.%N)
      if OMP_NUM_THREADS=4 ./gpu/sluice train examples/arithmetic.toml --json --fresh --steps 100 \
        --set model.device="$device" --set model.dtype="$dtype" --out "gpu/runs/$name" > "$out/train-$name.jsonl" 2> "$out/train-$name.err"
      then status "train-$name" ok; else status "train-$name" failed; tail -5 "$out/train-$name.err"; fi
      echo "$start $(date +%s.%N)" > "$out/train-$name.wall"
    done
    echo "== 4. throughput at Qwen2.5-0.5B shapes, vocab 151936, bf16"
    for run in 64: 256:--checkpoint-layers; do
      IFS=: read -r batch extra <<<"$run"
      # shellcheck disable=SC2086
      if ./gpu/throughput --device cuda --preset qwen2-0.5b --vocab 151936 --dtype bf16 --batch "$batch" \
        --prompt-len 128 --new 128 --iters 3 $extra --json > "$out/throughput-b$batch.json" 2> "$out/throughput-b$batch.err"
      then status "throughput-b$batch" ok; cat "$out/throughput-b$batch.json"; else status "throughput-b$batch" failed; tail -5 "$out/throughput-b$batch.err"; fi
    done
    python3 - "$out" <<'PY'
import glob, json, os, re, sys
out = sys.argv[1]
report = {"gpu": open(f"{out}/gpu.txt").read().strip() if os.path.exists(f"{out}/gpu.txt") else None,
          "status": dict(l.split() for l in open(f"{out}/status.txt") if l.strip())}
report["parity"] = [l.strip() for l in open(f"{out}/parity.log") if l.startswith("parity ")]
report["nccl"] = [l.strip() for l in open(f"{out}/nccl.log") if re.match(r"(test |.*SKIPPED)", l)]
report["train"] = {}
for f in sorted(glob.glob(f"{out}/train-*.jsonl")):
    name = os.path.basename(f)[len("train-"):-len(".jsonl")]
    ev = [json.loads(l) for l in open(f) if l.startswith("{")]
    steps = [e for e in ev if e.get("event") == "step"]
    sec = sorted(e["step_seconds"] for e in steps) or [float("nan")]
    a, b = map(float, open(f"{out}/train-{name}.wall").read().split())
    report["train"][name] = {"steps": len(steps), "wall_s": round(b - a, 1), "median_step_s": round(sec[len(sec) // 2], 4),
                             "evals": [(e["step"], round(e["reward_mean"], 3)) for e in ev if e.get("event") == "eval"]}
report["throughput"] = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/throughput-*.json")) if os.path.getsize(f)]
json.dump(report, open(f"{out}/report.json", "w"), indent=1)
print(json.dumps(report, indent=1))
PY
    ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# GPU checks for a machine with PyTorch 2.11.0+cu130 and no Rust toolchain.
#
#   ./scripts/gpu-check.sh prepare   # here: copy stripped binaries to gpu/ (ignored; carry it)
#   ./scripts/gpu-check.sh run       # on the GPU machine, from the repository root
#
# `run` does, in one go, writing logs under $OUT (or gpu/out):
# 1. the learner's NCCL unit tests: they skip (and say so) without CUDA; on one GPU
#    they check a one-rank communicator on real CUDA tensors and that only one NCCL
#    library is loaded; on two or more GPUs also a two-rank all-reduce and broadcast
#    whose ranks hold different values (on one GPU the two-rank test prints SKIPPED);
# 2. `sluice train examples/arithmetic.toml` for 100 GRPO steps on CUDA in f32 and
#    in bf16, and on the CPU in f32 with the same binary (the learning curves);
# 3. the throughput benchmark (generation and training tokens/s against
#    transformers / PyTorch on the same GPU) for the `small` and `qwen2-0.5b` presets.
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
    objcopy --strip-all "$(exe sluice_learner -p sluice-learner --lib)" gpu/learner-unit-tests
    objcopy --strip-all "$(exe throughput -p sluice-learner --bench throughput)" gpu/throughput
    objcopy --strip-all target/debug/sluice gpu/sluice
    for b in gpu/*; do ldd "$b" | grep -q libtorch_cuda || { echo "$b does not link libtorch_cuda" >&2; exit 1; }; done
    ls -la gpu
    ;;
  run)
    out="${OUT:-gpu/out}"; mkdir -p "$out"
    TORCH_LIB=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
    export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SLUICE_PYTHON=python3
    nvidia-smi --query-gpu=name,driver_version --format=csv || true
    nvidia-smi -L || true
    echo "== 1. NCCL"
    ./gpu/learner-unit-tests nccl --nocapture --test-threads 1 2>&1 | tee "$out/nccl.log"
    echo "== 2. sluice train on CUDA (f32, bf16) and CPU (f32)"
    for run in cuda-f32:cuda:f32 cuda-bf16:cuda:bf16 cpu-f32:cpu:f32; do
      IFS=: read -r name device dtype <<<"$run"
      start=$(date +%s.%N)
      OMP_NUM_THREADS=4 ./gpu/sluice train examples/arithmetic.toml --json --fresh --steps 100 \
        --set model.device="$device" --set model.dtype="$dtype" --out "gpu/runs/$name" > "$out/train-$name.jsonl" 2> "$out/train-$name.err"
      grep '^policy:' "$out/train-$name.err"
      end=$(date +%s.%N)
      python3 - "$out/train-$name.jsonl" "$name" "$start" "$end" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
evals = [(e["step"], round(e["reward_mean"], 3)) for e in ev if e.get("event") == "eval"]
steps = [e for e in ev if e.get("event") == "step"]
sec = sorted(e["step_seconds"] for e in steps)
print(f"{sys.argv[2]}: {len(steps)} steps in {float(sys.argv[4]) - float(sys.argv[3]):.1f} s wall, "
      f"median step {sec[len(sec)//2]:.3f} s; evals (step, mean reward): {evals}")
PY
    done
    echo "== 3. throughput vs transformers / PyTorch"
    ./gpu/throughput --device cuda --preset small --batch 64 --prompt-len 64 --new 64 --iters 5 2>&1 | tee "$out/throughput-small.log"
    ./gpu/throughput --device cuda --preset qwen2-0.5b --batch 16 --prompt-len 128 --new 128 --iters 3 2>&1 | tee "$out/throughput-qwen2-0.5b.log"
    ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# GPU checks for a machine with PyTorch 2.11.0+cu130 and no Rust toolchain.
#
#   ./scripts/gpu-check.sh prepare   # here: copy the learner's unit-test binary, stripped, to gpu/
#   ./scripts/gpu-check.sh run       # on the GPU machine (carry gpu/): NCCL all-reduce/broadcast test
#
# The NCCL tests skip (and say so) without CUDA; on one GPU they check a one-rank
# communicator on real CUDA tensors and that only one NCCL library is loaded; on
# two or more GPUs also a two-rank all-reduce and broadcast (one GPU per rank)
# whose ranks hold different values. On one GPU the two-rank test prints SKIPPED.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  prepare)
    source scripts/env.sh
    bin=$(cargo test -p sluice-learner --lib --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    mkdir -p gpu
    objcopy --strip-debug "$bin" gpu/learner-unit-tests
    ls -la gpu/learner-unit-tests
    ;;
  run)
    TORCH_LIB=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
    export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version --format=csv || true
    nvidia-smi -L || true
    ./gpu/learner-unit-tests nccl --nocapture --test-threads 1
    ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Every benchmark once, at its smallest size, so their code cannot rot: the bench
# binaries of the dev build (`cargo build --workspace --all-targets`, which
# setup.sh runs) with tiny arguments. Nothing is measured or asserted beyond
# "runs to the end"; the figures in docs/BENCHMARKS.md come from release builds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SLUICE_ROOT"
TORCH_LIB="$("$SLUICE_PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# name -> executable, from the (already built) bench targets.
declare -A exe
while IFS=$'\t' read -r name path; do exe[$name]=$path; done < <(
  cargo test --workspace --benches --no-run --message-format=json 2>/dev/null | "$SLUICE_PYTHON" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"] + "\t" + m["executable"])
')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() {
  local name=$1; shift
  [ -n "${exe[$name]:-}" ] || { echo "bench-smoke: no bench target $name" >&2; exit 1; }
  local t0=$SECONDS
  if ! "${exe[$name]}" "$@" > "$out/$name.txt" 2>&1; then
    echo "bench-smoke: $name failed:" >&2; tail -30 "$out/$name.txt" >&2; exit 1
  fi
  echo "bench-smoke: $name ok ($((SECONDS - t0)) s)"
}
run throughput --preset tiny --batch 2 --prompt-len 4 --new 4 --iters 1 --threads 1
run knapsack --seeds 1 --steps 2 --sft-steps 2
run objectives --seeds 1 --steps 2 --sft-steps 2
run bgpo_memory --ns 1,2 --batch 1 --prompt 4 --response 8
run long_tail --preset tiny --rows 8 --slots 2 --iters 1 --threads 1
run head_memory --vocab 300 --hidden 32 --layers 1 --batch 2 --len 8
run dataplane ingest weights broadcast delta staleness stale-objective time-to-reward --smoke
run reward score annotate --smoke
run oni stalled claim --steps 2 --seeds 1 --rooms 2 --out "$out"
expected=9
[ "${#exe[@]}" -eq "$expected" ] || { echo "bench-smoke: ${#exe[@]} bench targets, this script runs $expected: add the new one" >&2; exit 1; }

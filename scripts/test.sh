#!/usr/bin/env bash
# The test command: set up what is missing, then run every test of the workspace.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$SLUICE_ROOT/scripts/setup.sh"
cd "$SLUICE_ROOT"
TORCH_LIB="$("$SLUICE_PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# libtorch's intra-op threads: one per core is the fastest on small models and
# keeps parallel test processes from oversubscribing the CPU.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cargo test --workspace "$@"
# Every benchmark once at its smallest size (compiled and run, nothing asserted).
"$SLUICE_ROOT/scripts/bench-smoke.sh"
# The Helm chart: lint, render, validate against the Kubernetes schemas, check ranks.
"$SLUICE_ROOT/scripts/chart-check.sh"
# The browser test's screenshot of a job's dashboard page (a CI artefact).
if [ -f "$SLUICE_ROOT/target/tmp/dashboard-job.png" ]; then
  echo "test: dashboard screenshot at target/tmp/dashboard-job.png"
fi

#!/usr/bin/env bash
# The main job: set up what is missing, then train the example arithmetic policy
# (supervised warm-up + GRPO) on this machine. Extra arguments go to `sluice train`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$SLUICE_ROOT/scripts/setup.sh"
cd "$SLUICE_ROOT"
exec ./target/debug/sluice train "${JOB:-examples/arithmetic.toml}" "$@"

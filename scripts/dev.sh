#!/usr/bin/env bash
# The main job: set up what is missing, then run the example arithmetic job
# (supervised warm-up + GRPO) with `sluice dev`: orchestrator, reward server,
# learner and actor as real processes on this machine. Extra arguments go to
# `sluice dev` (e.g. --json, --redis redis://127.0.0.1:6379).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$SLUICE_ROOT/scripts/setup.sh"
cd "$SLUICE_ROOT"
exec ./target/debug/sluice dev "${JOB:-examples/arithmetic.toml}" "$@"

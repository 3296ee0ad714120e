#!/usr/bin/env bash
# Rollouts generated and never trained in a `sluice dev` job: rounds of work the
# orchestrator opened against steps the learner trained, and the wall time.
#   scripts/bench-waste.sh BIN_DIR MAX_STALENESS STEPS
# BIN_DIR holds sluice, sluice-orchestrator, sluice-learner, sluice-actor and
# sluice-reward-server (e.g. target/debug). Job: examples/arithmetic.toml with
# `steps` and `rollout.max_staleness` set. Prints one line.
set -euo pipefail
bin=$(cd "$1" && pwd); s=$2; n=$3
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
sed "s/^steps = 300/steps = $n/; s|^out_dir = .*|out_dir = \"$d/run\"|" "$root/examples/arithmetic.toml" > "$d/job.toml"
printf '\n[rollout]\nmax_staleness = %s\n' "$s" >> "$d/job.toml"
t0=$(date +%s.%N)
"$bin/sluice" dev "$d/job.toml" --json --bin-dir "$bin" > "$d/dev.jsonl" 2> "$d/dev.err"
t1=$(date +%s.%N)
rounds=$(grep -c '"event":"round"' "$d/dev.jsonl"); steps=$(grep -c '"event":"step"' "$d/dev.jsonl")
python3 -c "print('max_staleness=$s rounds_opened=$rounds steps=$steps never_trained=%.3f wall_s=%.1f' % (1 - $steps / $rounds, $t1 - $t0))"

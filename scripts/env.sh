# Sourced by the other scripts: where the project's Python and libtorch live.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SLUICE_ROOT="$ROOT"
export SLUICE_VENV="$ROOT/.venv"
export SLUICE_PYTHON="$SLUICE_VENV/bin/python"
# tch builds against the torch wheel in the venv (tch 0.24 <-> torch 2.11.0).
export LIBTORCH_USE_PYTORCH=1
export PATH="$SLUICE_VENV/bin:$HOME/.cargo/bin:$PATH"
# `source scripts/env.sh` in a shell: the built binaries on PATH and the venv's
# libtorch on the loader path, so `sluice …` runs as the README writes it.
export PATH="$ROOT/target/debug:$PATH"
# (An `if`, not `[ … ] &&`: before setup made the venv the test is false, and a
# sourced script must not end on a failing command under `set -e`.)
for lib in "$SLUICE_VENV"/lib/python3*/site-packages/torch/lib; do
  if [ -d "$lib" ]; then
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done

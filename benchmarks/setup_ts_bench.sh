#!/usr/bin/env bash
# Installs what TorchServe's stock image_classifier handler imports (torchvision,
# captum and their pure-Python dependencies) into build/ts_bench_deps/ (ignored),
# without touching .venv: bench_torchserve.py puts that folder on the workers'
# PYTHONPATH. torch itself is the project's (2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q --target build/ts_bench_deps --no-deps \
    -r benchmarks/requirements-torchserve.txt
echo "[bench] stock-handler dependencies in build/ts_bench_deps"

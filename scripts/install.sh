#!/usr/bin/env bash
# Installs everything camserve needs into ./.venv (idempotent): a Java runtime for
# TorchServe through apt where missing, then the package with its serving, ONNX
# and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
    echo "[install] no Java runtime: installing openjdk-17-jre-headless through apt"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.camserve-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q -e ".[serving,onnx,audit,examples,dev]"
    echo "$want" > "$stamp"
fi
echo "[install] environment ready in .venv"

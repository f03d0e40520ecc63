#!/usr/bin/env bash
# The main job: install everything, build the demo models if model_store/ is
# empty, archive them, start TorchServe with the handlers in the background and
# the gRPC gateway in front of it in the foreground (it prints a command that
# calls it). Ctrl-C stops the gateway gracefully, then TorchServe.
# Extra args go to `camserve serve`, e.g.
#   bash scripts/run.sh --no-token-auth     # loopback development only
# (CAMSERVE_TOKEN_AUTH=0 does the same). Gateway settings: CAMSERVE_GATEWAY_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
"$PY" -m camserve.cli build-models --onnx
"$PY" -m camserve.cli serve --background --model efficientnet_lite0 --model resnet_gap_onnx "$@"
trap '"$PY" -m camserve.cli stop' EXIT
keys=(); [ -f var/torchserve/key_file.json ] && keys=(--torchserve-key-file var/torchserve/key_file.json)
"$PY" -m camserve.cli gateway --backend torchserve ${keys[@]+"${keys[@]}"}

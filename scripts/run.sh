#!/usr/bin/env bash
# The main job: install everything, build the demo models if model_store/ is
# empty, archive them for TorchServe and serve them in the foreground (Ctrl-C
# stops TorchServe cleanly). Extra args go to `camserve serve`, e.g.
#   bash scripts/run.sh --no-token-auth     # loopback development only
# (CAMSERVE_TOKEN_AUTH=0 does the same).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
"$PY" -m camserve.cli build-models
exec "$PY" -m camserve.cli serve "$@"

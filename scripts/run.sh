#!/usr/bin/env bash
# The main job: install everything, then run camserve with the demo models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/camserve --help

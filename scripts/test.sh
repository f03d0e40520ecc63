#!/usr/bin/env bash
# The test command: installs what is missing, then lint, type checks and the
# whole test suite (slow end-to-end tests included). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
echo "[test] ruff"
"$PY" -m ruff check .
echo "[test] gRPC stubs (generated from protos/, never committed; mypy reads their .pyi)"
"$PY" -m camserve.gateway.codegen >/dev/null
echo "[test] mypy"
targets=(camserve); compgen -G "handlers/*.py" >/dev/null && targets+=(handlers)
"$PY" -m mypy "${targets[@]}"
echo "[test] import rules (import-linter contracts in pyproject.toml)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/lint-imports
echo "[test] model store (trains the demo models if missing, then archives them)"
"$PY" -m camserve.cli build-models
echo "[test] pytest"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "[test] no tests collected"; exit 1; fi
exit "$rc"

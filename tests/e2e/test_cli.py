"""`camserve serve --background` / `camserve stop`, and the printed curl command as written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from camserve.torchserve.config import ServeConfig
from camserve.torchserve.process import TorchServe

from .conftest import REPO_ROOT, free_run, model_of, store_models

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_serve_prints_a_curl_command_that_works(tmp_path: Path) -> None:
    store_models()
    name = model_of("classifier")
    run_dir = tmp_path / "run"
    port, grpc_port = free_run(3), free_run(2) + 1000
    cmd = [sys.executable, "-m", "camserve.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        out = subprocess.run(
            [
                *cmd,
                "serve",
                "--background",
                "--run-dir",
                str(run_dir),
                "--models",
                name,
                "--port",
                str(port),
                "--grpc-port",
                str(grpc_port),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"http://127.0.0.1:{port}" in out.stdout
        curl = next(
            line.strip() for line in out.stdout.splitlines() if line.strip().startswith("curl ")
        )
        reply = subprocess.run(
            curl, shell=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
        )
        res = json.loads(reply.stdout)
        assert res["model"] == name and res["predictions"]
        assert set(res["explanations"][0]["maps"]["gradcam"]) == {"box"}
    finally:
        stop = subprocess.run(
            [*cmd, "stop", "--run-dir", str(run_dir)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert TorchServe(ServeConfig(run_dir=run_dir)).running_pid() is None

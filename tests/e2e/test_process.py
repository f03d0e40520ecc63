"""TorchServe's process tree: started, managed, found from another process, stopped by signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from camserve.torchserve.config import ServeConfig
from camserve.torchserve.management import ManagementError
from camserve.torchserve.process import TorchServe

from .conftest import REPO_ROOT, STORE, free_run, model_of

pytestmark = pytest.mark.slow


def _tree(ts: TorchServe) -> list[psutil.Process]:
    frontend = psutil.Process(ts.running_pid())
    return [frontend, *frontend.children(recursive=True)]


def test_start_manage_and_stop_orphans_from_another_object(tmp_path: Path) -> None:
    model = model_of("classifier")
    config = ServeConfig.free_ports(model_store=STORE, run_dir=tmp_path / "run", models=[model])
    ts = TorchServe(config)
    try:
        ts.start()
        ts.wait_ready(timeout=240)
        assert ts.management.models() == [model]
        assert ts.management.ready([model])
        versions = ts.management.describe(model)
        assert versions[0]["modelName"] == model and versions[0]["workers"]
        with pytest.raises(ManagementError) as info:
            ts.management.describe("no_such_model")
        assert info.value.status == 404
        tree = _tree(ts)
        assert len(tree) >= 2  # the JVM and a Python worker
        worker = next(p for p in tree if "model_service_worker" in " ".join(p.cmdline()))
        assert str(REPO_ROOT) in worker.environ()["PYTHONPATH"].split(os.pathsep)
        # The launcher dies hard: the JVM and its worker live on, orphaned.
        assert ts.proc is not None
        ts.proc.kill()
        ts.proc.wait()
        assert all(p.is_running() for p in tree)
        # `camserve stop` runs in another process: a fresh object on the run folder.
        other = TorchServe(ServeConfig(run_dir=tmp_path / "run"))
        assert other.running_pid() == ts.running_pid()
        other.stop()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, alive
        assert other.running_pid() is None and not (tmp_path / "run" / "launcher.json").exists()
    finally:
        ts.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_in_the_foreground_stops_cleanly_on_a_signal(tmp_path: Path, signum: int) -> None:
    model = model_of("classifier")
    run = tmp_path / "run"
    port, grpc_port = free_run(3), free_run(2) + 1000
    cmd = [
        sys.executable,
        "-m",
        "camserve.cli",
        "serve",
        "--model-store",
        str(STORE),
        "--run-dir",
        str(run),
        "--models",
        model,
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert proc.poll() is None, "".join(lines)
        ts = TorchServe(ServeConfig(run_dir=run))
        tree = _tree(ts)
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "[camserve] stopped" in rest
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, alive
        assert ts.running_pid() is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        TorchServe(ServeConfig(run_dir=run)).stop()

"""TorchServe's process control and management client without a server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import camserve
from camserve.torchserve.config import ServeConfig, free_port
from camserve.torchserve.management import ManagementClient, ManagementError
from camserve.torchserve.process import TorchServe, stop_signals


def test_stop_without_a_server_is_harmless(tmp_path: Path) -> None:
    ts = TorchServe(ServeConfig(run_dir=tmp_path / "run"))
    assert ts.running_pid() is None
    ts.stop()
    assert ts.running_pid() is None


def test_workers_import_this_camserve(tmp_path: Path) -> None:
    env = TorchServe(ServeConfig(run_dir=tmp_path / "run")).env()
    root = Path(camserve.__file__).resolve().parents[1]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(root)
    assert env["TMPDIR"] == str(tmp_path / "run" / "tmp")
    assert env["LOG_LOCATION"] == env["METRICS_LOCATION"] == str(tmp_path / "run" / "logs")


def test_sigterm_becomes_keyboard_interrupt_only_inside_the_block() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal interrupts this
    assert signal.getsignal(signal.SIGTERM) is before


def test_management_client_without_a_server_raises() -> None:
    client = ManagementClient(f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(ManagementError) as info:
        client.models()
    assert info.value.status is None
    assert client.worker_status(["a"]) == {"a": []} and not client.ready(["a"])

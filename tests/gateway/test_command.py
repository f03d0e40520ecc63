"""``camserve gateway`` as users run it: a subprocess on loopback, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from camserve.client import Client
from camserve.service import ExplainRequest
from tests.gateway.test_inprocess import SCENE, STORE

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@contextmanager
def gateway(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``camserve gateway ARGS`` on a free port, serving from the store (output piped);
    killed on the way out if a test left it running."""
    cmd = [sys.executable, "-m", "camserve.cli", "gateway", "--model-store", str(STORE)]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_gateway_command_serves_and_stops_gracefully(tmp_path: Path) -> None:
    with gateway("--model", "resnet_gap", "--model", "vqa", "--metrics-port", "0") as proc:
        assert proc.stdout is not None
        lines = []
        address = None
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"listening on (\S+:\d+)", line)
            if found:
                address = found.group(1)
                break
        assert address is not None, "".join(lines)
        metrics_line = proc.stdout.readline()
        found = re.search(r"metrics on (http://\S+/metrics)", metrics_line)
        assert found, metrics_line
        with Client(address, timeout=60) as client:
            result = client.explain(ExplainRequest("resnet_gap", image=SCENE, top_k=2))
            assert len(result.targets) == 2
            assert sorted(m.name for m in client.list_models()) == ["resnet_gap", "vqa"]
        text = urllib.request.urlopen(found.group(1), timeout=30).read().decode()
        assert (
            'camserve_gateway_request_latency_seconds_count{device="cpu",kind="classifier"' in text
        )
        stage = (
            'camserve_stage_latency_seconds_count{device="cpu",model="resnet_gap",stage="forward"}'
        )
        assert stage in text
        explain = subprocess.run(
            [
                sys.executable,
                "-m",
                "camserve.cli",
                "explain",
                str(STORE / "examples" / "scene_1.png"),
                "--model",
                "resnet_gap",
                "--remote",
                address,
                "--top-k",
                "2",
                "--methods",
                "gradcam,layercam",
                "--out",
                str(tmp_path),
                "--quiet",
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert explain.returncode == 0, explain.stdout + explain.stderr
        report = json.loads((tmp_path / "explanations.json").read_text())
        (entry,) = report["results"]
        assert len(entry["targets"]) == 2
        assert set(entry["targets"][0]["maps"]) == {"gradcam", "layercam"}
        assert all((tmp_path / m["figure"]).exists() for m in entry["targets"][0]["maps"].values())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "gateway stopped" in out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_right_after_the_ready_line_stops_the_gateway_gracefully(signum: int) -> None:
    """The handlers are in place before "Ctrl-C stops it" is printed: no traceback, exit 0."""
    with gateway("--model", "resnet_gap", "--no-metrics") as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(lines) + out
        assert "Traceback" not in out, out
        assert "gateway stopped" in out


def test_gateway_command_refuses_a_public_address_without_a_token() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "camserve.cli",
            "gateway",
            "--host",
            "0.0.0.0",
            "--model",
            "resnet_gap",
            "--model-store",
            str(STORE),
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "loopback" in proc.stdout + proc.stderr

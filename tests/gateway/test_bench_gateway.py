"""Smoke test of benchmarks/bench_gateway.py (--quick): the script runs and reports sane numbers.

Speed goals live in BENCHMARKS.md, never in tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_bench_gateway_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_gateway.py"),
            "--quick",
            "--clients",
            "1,4",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Goals:" in proc.stdout
    data = json.loads(out.read_text())
    for key in ("inprocess", "grpc"):
        assert data["latency"][key]["p50_ms"] > 0
    for label in ("batching_off", "batching_on"):
        for value in data["throughput"][label].values():
            assert math.isfinite(value) and value > 0
    ceiling = data["service_batching_ceiling"]
    assert math.isfinite(ceiling["gain"]) and ceiling["gain"] > 0
    assert "[ceiling]" in proc.stdout

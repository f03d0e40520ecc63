"""Smoke test of benchmarks/bench_onnx.py (--quick, tiny network), so the script cannot rot.

It checks that the workload runs on both runtimes and reports sane numbers, not
how fast anything is: timings belong in BENCHMARKS.md, never in tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_onnx_quick(tmp_path: Path) -> None:
    out = tmp_path / "onnx.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_onnx.py"), "--quick",
           "--models", "tiny", "--batches", "1,2", "--threads", "1", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Goal:" in proc.stdout
    data = json.loads(out.read_text())
    res = data["results"]["tiny"]
    assert res["provider"] == "CPUExecutionProvider" or "CUDA" in res["provider"]
    assert set(res["batches"]) == {"1", "2"}
    for entry in res["batches"].values():
        assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0
        assert entry["onnx_s"] > 0 and entry["torch_s"] > 0
        assert entry["onnx_stages_s"]["forward"] > 0
        assert math.isfinite(entry["cpu_ratio"]) and entry["cpu_ratio"] > 0


def test_onnx_profile_runs_on_the_tiny_network(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "onnx_profile.py"), "--model", "tiny",
           "--batch", "2", "--rounds", "1", "--threads", "1", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no profile left behind
    data = json.loads(out.read_text())
    assert data["joint_profile_ms"]["Conv"] > 0
    assert set(data["median_ms"]) == {"joint", "plain", "torch_forward"}
    assert all(math.isfinite(v) and v > 0 for v in data["median_ms"].values())

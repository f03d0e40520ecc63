"""Smoke test of benchmarks/bench_engine.py (--quick, tiny network), so the script cannot rot.

It checks that every workload runs and reports sane numbers, not how fast anything
is: timings belong in BENCHMARKS.md, never in tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_engine.py"
CAMSERVE_WORKLOADS = {
    "fwd", "cs.top5x7", "cs.top5x7.upsampled", "cs.top5x7.b8", "cs.top5x5pgc", "cs.top5x4tc",
    "cs.top5.gradcam", "cs.ablation.top5", "cs.ablation.top1", "cs.ablation.b8", "fwd.b8",
    "fwd.autograd",
}
PEER_WORKLOADS = {
    "pgc.top5x5.loop", "pgc.top5x5.batched", "pgc.ablation.top1", "captum.top5.gradcam",
    "torchcam.top5x4",
}


def _run(python: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [python, str(SCRIPT), "--quick", "--models", "tiny", "--size", "64", "--threads", "1",
           "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Goals:" in proc.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def _check_timing(timing: dict[str, Any], names: set[str]) -> None:
    assert names <= set(timing), names - set(timing)
    for name, entry in timing.items():
        assert entry["n"] >= 1, name
        assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0, name
        assert entry["median_s"] > 0, name


def test_camserve_path_quick(tmp_path: Path) -> None:
    data = _run(sys.executable, tmp_path, "--peers", "none", "--memory")
    res = data["results"]["tiny"]
    _check_timing(res["timing"], CAMSERVE_WORKLOADS)
    assert not PEER_WORKLOADS & set(res["timing"])
    stages = res["timing"]["cs.top5x7"]["stages_s"]
    assert {"forward", "backward", "total"} <= set(stages)
    assert "per_image_vs_batch1" in res["timing"]["cs.top5x7.b8"]
    # No peers asked for: only the peer-free Grad-CAM++ formula reference, which must agree.
    [check] = res["crosscheck"]
    assert check["method"] == "gradcampp" and check["peer"].startswith("002 eq. 9")
    assert check["norm_max_abs"] < 1e-5 and check["raw_max_rel"] < 1e-5
    assert set(res["memory"]) == {"fwd", "cs.top5x7"}
    assert all(m["extra_mib"] >= 0 for m in res["memory"].values())
    assert data["meta"]["peers"] == {}


def _bench_python() -> str:
    """The bench environment's interpreter (benchmarks/setup_env.sh), or skip."""
    python = os.environ.get("CAMSERVE_BENCH_PYTHON") or str(ROOT / "benchmarks/.venv/bin/python")
    if not Path(python).exists():
        pytest.skip("peers not installed here: create the bench env with benchmarks/setup_env.sh "
                    "or point CAMSERVE_BENCH_PYTHON at one")
    return python


@pytest.mark.slow
def test_peer_paths_quick(tmp_path: Path) -> None:
    data = _run(_bench_python(), tmp_path, "--no-memory")
    assert data["meta"]["peers"] == {"pytorch-grad-cam": None, "captum": None, "torchcam": None}
    res = data["results"]["tiny"]
    _check_timing(res["timing"], CAMSERVE_WORKLOADS | PEER_WORKLOADS)
    checks = {(c["method"], c["peer"]): c for c in res["crosscheck"]}
    # Grad-CAM is defined alike everywhere: the maps must agree.
    for peer in ("pytorch-grad-cam", "captum", "torchcam"):
        assert checks[("gradcam", peer)]["norm_max_abs"] < 1e-4, peer
    for method in ("xgradcam", "layercam", "hirescam", "ablationcam (top-1)"):
        assert checks[(method, "pytorch-grad-cam")]["norm_max_abs"] < 1e-4, method

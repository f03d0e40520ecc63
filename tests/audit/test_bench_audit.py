"""Smoke test of benchmarks/bench_audit.py (camserve alone, two images), so the script cannot rot.

It checks that the script runs and reports sane numbers, not how fast anything is:
timings belong in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_audit_quick(zoo_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_audit.py"), "--store", str(zoo_store),
         "--images", "2", "--rounds", "1", "--peers", "none", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    res = data["results"]["camserve"]
    assert set(data["results"]) == {"camserve"} and res["methods"] == 6
    assert math.isfinite(res["images_per_s"]) and res["images_per_s"] > 0
    assert "camserve" in proc.stdout

"""Per-call overhead of the engine: the minimum time over many repetitions, per workload.

On a shared, loaded machine the interleaved medians of ``bench_engine.py`` are
noise for a small model; the minimum over repetitions is what the code itself
costs. Run it once per engine version, in alternating processes:

    PYTHONPATH=/tmp/base .venv/bin/python benchmarks/engine_overhead.py   # before
    PYTHONPATH=$PWD .venv/bin/python benchmarks/engine_overhead.py        # after
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_workloads import TinyNet

import camserve.engine
from camserve.engine import Explainer

GRADIENT_METHODS = [
    "gradcam", "gradcam_pos", "gradcampp", "xgradcam", "counterfactual", "layercam", "hirescam",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    p.add_argument("--rounds", type=int, default=60, help="repetitions (default 60)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TinyNet().eval()
    x1 = torch.randn(1, 3, args.size, args.size)
    x8 = torch.randn(8, 3, args.size, args.size)
    ex = Explainer(model, "layer4")

    def forward() -> Any:
        with torch.inference_mode():
            return model(x1)

    jobs: dict[str, Callable[[], Any]] = {
        "forward": forward,
        "top5x7": lambda: ex.explain(x1, methods=GRADIENT_METHODS, targets=5),
        "top5x7.b8": lambda: ex.explain(x8, methods=GRADIENT_METHODS, targets=5),
        "ablation.top5": lambda: ex.explain(x1, methods=["ablationcam"], targets=5),
        "guided_gradcam.top5": lambda: ex.explain(x1, methods=["guided_gradcam"], targets=5),
    }
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(args.rounds):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "engine": camserve.engine.__file__,
                "size": args.size,
                "threads": args.threads,
                "min_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

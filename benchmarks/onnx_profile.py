"""Where an exported graph's time goes: onnxruntime's profile per operator type, and
the joint graph (forward + gradients + maps) against a plain forward export.

For one model of ``bench_onnx.py`` (default: the ResNet-50-shaped network) at one
batch size: export it with :func:`camserve.export.export_onnx` (top-5) and with
``torch.onnx.export`` (the forward alone), then

1. run the joint graph under onnxruntime's profiler and sum the kernel time per
   operator type (what is not ``Conv`` is the price of the maps and gradients);
2. time, interleaved round by round, the joint graph, the plain graph and torch's
   forward (``torch.no_grad``), with the same thread count.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/onnx_profile.py --model resnet50 --batch 8
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_onnx import MODELS

from camserve.export import export_onnx


def _session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = profile
    if profile:  # the profile goes next to the graph (a temporary folder), not into the cwd
        options.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_by_op(
    path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int
) -> dict[str, float]:
    """Milliseconds per call of each operator type (onnxruntime's node kernel times)."""
    sess = _session(path, threads, profile=True)
    for _ in range(runs):
        sess.run(None, feeds)
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    return {k: v / runs / 1000.0 for k, v in by_op.most_common()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, layer, size = MODELS[args.model]()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=gen)
    results: dict[str, Any] = {"model": args.model, "batch": args.batch, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        joint_path, plain_path = Path(tmp) / "joint.onnx", Path(tmp) / "plain.onnx"
        export_onnx(
            model, torch.randn(2, 3, size, size, generator=gen), layer, joint_path, targets=5
        )
        torch.onnx.export(
            model, (x[:2],), str(plain_path), dynamo=True, input_names=["images"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        )  # fmt: skip
        feeds = {"images": x.numpy(), "class_ids": np.full((args.batch, 5), -1, np.int64)}
        by_op = profile_by_op(joint_path, feeds, args.threads, args.rounds)
        results["joint_profile_ms"] = by_op
        total = sum(by_op.values())
        print(f"joint graph, onnxruntime kernel time per call: {total:.1f} ms")
        for op, ms in list(by_op.items())[:12]:
            print(f"  {op:16s} {ms:8.1f} ms")
        joint, plain = _session(joint_path, args.threads), _session(plain_path, args.threads)
        plain_in = plain.get_inputs()[0].name

        def run_torch() -> None:
            with torch.no_grad():
                model(x)

        calls = {
            "joint": lambda: joint.run(None, feeds),
            "plain": lambda: plain.run(None, {plain_in: feeds["images"]}),
            "torch_forward": run_torch,
        }
        for call in calls.values():
            call()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    results["median_ms"] = med
    fwd = med["torch_forward"]
    print(
        f"per call: joint {med['joint']:.1f} ms, plain forward {med['plain']:.1f} ms, torch "
        f"forward {fwd:.1f} ms; plain / torch {med['plain'] / fwd:.2f}, "
        f"joint / torch {med['joint'] / fwd:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

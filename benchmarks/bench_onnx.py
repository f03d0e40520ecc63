"""onnxruntime explainer vs the torch engine: prediction + top-5 x the gradient family.

For each model: export it once with :func:`camserve.export.export_onnx`, then
time, interleaved round by round (the order alternates), the same request
through :class:`camserve.engine.Explainer` and
:class:`camserve.export.OnnxExplainer`: ``explain(x, GRADIENT_FAMILY, targets=5)``,
at batch 1 and batch 8. Reports medians per call and per image and the ratio
onnxruntime / torch (goal: <= 0.6 on the CPU), of wall time and of this
process's CPU time (``time.process_time``, every thread: steadier than wall time
when other jobs share the cores). Both use the same number of threads. Timings
belong here and in BENCHMARKS.md, never in tests.

Models: ``gap`` (the zoo's ResNet-GAP at 64 px, trained weights when
``model_store/`` has them), ``resnet50`` (a ResNet-50-shaped network built here
without torchvision, random init, 224 px, layer ``layer4``),
``efficientnet_lite0`` (224 px, layer ``_head_activation``; needs
``camserve.models.efficientnet``), ``tiny`` (for the smoke test).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_onnx.py --json onnx.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from engine_workloads import GOAL_METHODS
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.export import OnnxExplainer, export_onnx

GRADIENT_FAMILY = GOAL_METHODS
"""The workload: the engine benchmark's goal (a) method set, top-5."""


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck: 1x1, 3x3 (stride), 1x1 x4, projection skip when needed."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        result: Tensor = self.relu(out)
        return result


class ResNet50Shaped(nn.Module):
    """ResNet-50's layout (3-4-6-3 bottlenecks, 2048 x 7 x 7 at ``layer4``, 1000 classes)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = []
            for i in range(blocks):
                seq.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits: Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


def _random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, so random-init activations stay in range."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _gap() -> tuple[nn.Module, str, int]:
    from camserve.zoo.models import ResNetGAP

    store = Path(__file__).resolve().parents[1] / "model_store"
    if (store / "manifest.json").is_file():
        from camserve.zoo import load

        model, entry = load(store, "resnet_gap")
        return model, entry.target_layer, 64
    return _random_bn(ResNetGAP()), "layer2", 64


def _efficientnet() -> tuple[nn.Module, str, int]:
    module: Any = importlib.import_module("camserve.models.efficientnet")
    return module.efficientnet_lite0(), str(module.DEFAULT_LAYER), 224


def _tiny() -> tuple[nn.Module, str, int]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    return net.eval(), "3", 32


MODELS: dict[str, Callable[[], tuple[nn.Module, str, int]]] = {
    "gap": _gap,
    "resnet50": lambda: (_random_bn(ResNet50Shaped()), "layer4", 224),
    "efficientnet_lite0": _efficientnet,
    "tiny": _tiny,
}


def _time(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all its threads) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_model(
    name: str, rounds: int, batches: list[int], threads: int, folder: Path, spinning: bool = True
) -> dict[str, Any]:
    """Export ``name``, then time torch vs onnxruntime at each batch size, interleaved."""
    model, layer, size = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    example = torch.randn(2, 3, size, size, generator=gen)
    t0 = time.perf_counter()
    report = export_onnx(model, example, layer, folder / f"{name}.onnx", targets=5)
    export_s = time.perf_counter() - t0
    ox = OnnxExplainer(report.path, threads=threads, spinning=spinning)
    ex = Explainer(model, layer)
    out: dict[str, Any] = {
        "layer": layer,
        "size": size,
        "export_s": round(export_s, 1),
        "max_abs_diff": report.max_abs_diff,
        "provider": ox.provider,
        "batches": {},
    }
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=gen)

        def run_torch(x: Tensor = x) -> None:
            ex.explain(x, GRADIENT_FAMILY, targets=5)

        def run_onnx(x: Tensor = x) -> None:
            ox.explain(x, GRADIENT_FAMILY, targets=5)

        run_torch()  # warm-up
        run_onnx()
        times: dict[str, list[float]] = {"torch": [], "onnx": []}
        cpu: dict[str, list[float]] = {"torch": [], "onnx": []}
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        for r in range(rounds):
            order = ("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")
            got = {k: _time(run_torch if k == "torch" else run_onnx) for k in order}
            for k, (wall, proc) in got.items():
                times[k].append(wall)
                cpu[k].append(proc)
            ratios.append(got["onnx"][0] / got["torch"][0])
            cpu_ratios.append(got["onnx"][1] / max(got["torch"][1], 1e-9))
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        stages = ox.explain(x, GRADIENT_FAMILY, targets=5).timings
        out["batches"][str(b)] = {
            "torch_s": med["torch"],
            "onnx_s": med["onnx"],
            "torch_per_image_s": med["torch"] / b,
            "onnx_per_image_s": med["onnx"] / b,
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "torch_cpu_s": med_cpu["torch"],
            "onnx_cpu_s": med_cpu["onnx"],
            "cpu_ratio": statistics.median(cpu_ratios),
            "cpu_ratio_range": [min(cpu_ratios), max(cpu_ratios)],
            "onnx_stages_s": {k: round(v, 6) for k, v in stages.items()},
        }
        print(
            f"{name:18s} batch {b}: torch {med['torch'] * 1e3:8.1f} ms  onnxruntime "
            f"{med['onnx'] * 1e3:8.1f} ms  ratio {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}-{max(ratios):.2f}]; CPU time ratio "
            f"{statistics.median(cpu_ratios):.2f} [{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}]",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="gap,resnet50,efficientnet_lite0")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="2 rounds (smoke test)")
    p.add_argument(
        "--no-spinning",
        action="store_true",
        help="onnxruntime's idle threads sleep (pair with OMP_WAIT_POLICY=PASSIVE for torch)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name not in MODELS:
                p.error(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
            try:
                results[name] = bench_model(
                    name, rounds, batches, args.threads, Path(tmp), not args.no_spinning
                )
            except ModuleNotFoundError as exc:
                skipped[name] = str(exc)
                print(f"{name}: skipped ({exc})", flush=True)
    payload = {
        "torch": torch.__version__,
        "onnxruntime": importlib.import_module("onnxruntime").__version__,
        "threads": args.threads,
        "onnxruntime_spinning": not args.no_spinning,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "methods": list(GRADIENT_FAMILY),
        "results": results,
        "skipped": skipped,
    }
    print("Goal: onnxruntime / torch <= 0.6 for prediction + top-5 x the gradient family")
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

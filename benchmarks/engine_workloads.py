"""Workloads of the engine benchmark: camserve and its peers on one model and one input.

Every workload is a closure that runs one complete job (prediction and maps)
and returns something to keep alive until the timer stops. The peers are
imported lazily, so this module imports with torch and camserve alone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "GOAL_METHODS",
    "PGC_METHODS",
    "TORCHCAM_METHODS",
    "Setup",
    "TinyNet",
    "Workload",
    "build_model",
    "build_workloads",
    "peer_status",
]

# Goal (a) of issue 2: prediction + top-5 x these seven gradient methods.
GOAL_METHODS = (
    "gradcam",
    "gradcam_pos",
    "gradcampp",
    "xgradcam",
    "counterfactual",
    "layercam",
    "hirescam",
)
# camserve id -> class name, for the methods each peer implements.
PGC_METHODS = {
    "gradcam": "GradCAM",
    "gradcampp": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
}
TORCHCAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcampp": "GradCAMpp",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
}
PEERS = {"pytorch-grad-cam": "pytorch_grad_cam", "captum": "captum", "torchcam": "torchcam"}


def peer_status(wanted: list[str]) -> dict[str, str | None]:
    """Peer name -> None when importable, else the reason it is skipped."""
    status: dict[str, str | None] = {}
    for name in wanted:
        module = PEERS[name]
        if importlib.util.find_spec(module) is None:
            status[name] = f"skipped: module {module!r} is not installed in this environment"
        else:
            status[name] = None
    return status


class TinyNet(nn.Module):
    """A ResNet-shaped toy (layer1..layer4, global average pool, linear head) for smoke tests."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        widths = (3, 8, 8, 16, 16)
        for i in range(4):
            stride = 1 if i == 0 else 2
            block = nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1),
                nn.BatchNorm2d(widths[i + 1]),
                nn.ReLU(inplace=True),
            )
            self.add_module(f"layer{i + 1}", block)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, device: torch.device) -> nn.Module:
    """Random-init model in eval mode: resnet18/resnet50 (torchvision) or tiny."""
    torch.manual_seed(0)
    if name == "tiny":
        model: nn.Module = TinyNet()
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device)


@dataclass
class Workload:
    """One timed job. ``images`` divides the time for per-image cost."""

    name: str
    fn: Callable[[], Any]
    group: str
    what: str
    images: int = 1
    max_runs: int | None = None  # slow peers: at most this many timed runs
    warmup: bool = True
    timings: list[dict[str, float]] = field(default_factory=list)  # camserve stage timings


@dataclass
class Setup:
    """The shared workload: one model instance, one image batch, one set of targets."""

    name: str
    model: nn.Module
    layer: str
    x1: torch.Tensor  # (1, 3, S, S)
    x8: torch.Tensor  # (8, 3, S, S)
    top5: list[int]  # the model's top-5 classes on x1

    @property
    def module(self) -> nn.Module:
        return dict(self.model.named_modules())[self.layer]


def make_setup(name: str, model: nn.Module, layer: str, size: int, device: torch.device) -> Setup:
    gen = torch.Generator().manual_seed(1)
    x8 = torch.randn(8, 3, size, size, generator=gen).to(device)
    x1 = x8[:1].clone()
    with torch.inference_mode():
        top5 = model(x1)[0].topk(5).indices.tolist()
    return Setup(name, model, layer, x1, x8, top5)


def plain_forward(s: Setup, batch8: bool = False) -> Callable[[], Any]:
    x = s.x8 if batch8 else s.x1

    def run() -> Any:
        with torch.inference_mode():
            return s.model(x)

    return run


def _camserve(s: Setup, methods: tuple[str, ...], x: torch.Tensor, w: list[Workload],
              k: int = 5, upsample: bool = False) -> Callable[[], Any]:
    from camserve.engine import Explainer

    explainer = Explainer(s.model, s.layer)

    def run() -> Any:
        res = explainer.explain(x, methods=methods, targets=k)
        maps = [res.upsampled(m) for m in methods] if upsample else None
        w[0].timings.append(dict(res.timings))
        return res, maps

    return run


def camserve_workloads(s: Setup) -> list[Workload]:
    """The goals of issue 2 and the camserve side of each peer comparison."""
    out: list[Workload] = []

    def add(name: str, what: str, methods: tuple[str, ...], x: torch.Tensor, k: int = 5,
            upsample: bool = False) -> None:
        holder: list[Workload] = []
        wl = Workload(name, _camserve(s, methods, x, holder, k, upsample), "camserve", what,
                      images=x.shape[0])
        holder.append(wl)
        out.append(wl)

    g7 = GOAL_METHODS
    add("cs.top5x7", "(a) prediction + top-5 x 7 gradient methods", g7, s.x1)
    add("cs.top5x7.upsampled", "same + normalised, upsampled maps", g7, s.x1, upsample=True)
    add("cs.top5x7.b8", "(c) same at batch 8, per image", g7, s.x8)
    add("cs.top5x5pgc", "top-5 x pytorch-grad-cam's 5 methods", tuple(PGC_METHODS), s.x1)
    add("cs.top5x4tc", "top-5 x torchcam's 4 methods", tuple(TORCHCAM_METHODS), s.x1)
    add("cs.top5.gradcam", "top-5 x Grad-CAM (captum's workload)", ("gradcam",), s.x1)
    add("cs.ablation.top5", "(b) prediction + top-5 Ablation-CAM at the layer", ("ablationcam",),
        s.x1)
    add("cs.ablation.top1", "top-1 Ablation-CAM (pytorch-grad-cam's workload)", ("ablationcam",),
        s.x1, k=1)
    add("cs.ablation.b8", "(c) top-5 Ablation-CAM at batch 8, per image", ("ablationcam",), s.x8)
    return out


def context_workloads(s: Setup) -> list[Workload]:
    def grad_forward() -> Any:
        with torch.enable_grad():
            return s.model(s.x1)

    return [
        Workload("fwd.b8", plain_forward(s, batch8=True), "context",
                 "plain forward, inference_mode, batch 8, per image", images=8),
        Workload("fwd.autograd", grad_forward, "context",
                 "plain forward with autograd recording (parameters require grad)"),
    ]


def _predict_top5(s: Setup) -> list[int]:
    """What a peer's user does first: a prediction to learn the top-5 classes."""
    with torch.inference_mode():
        out: list[int] = s.model(s.x1)[0].topk(5).indices.tolist()
    return out


def pgc_workloads(s: Setup, slow_ablation: bool, ablation_runs: int) -> list[Workload]:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = [getattr(pgc, c) for c in PGC_METHODS.values()]

    def loop() -> Any:
        top5 = _predict_top5(s)
        maps = []
        for cls in classes:
            with cls(model=s.model, target_layers=[s.module]) as cam:
                for c in top5:
                    maps.append(cam(input_tensor=s.x1, targets=[ClassifierOutputTarget(c)]))
        return maps

    def batched() -> Any:
        top5 = _predict_top5(s)
        xk = s.x1.repeat(len(top5), 1, 1, 1)
        targets = [ClassifierOutputTarget(c) for c in top5]
        maps = []
        for cls in classes:
            with cls(model=s.model, target_layers=[s.module]) as cam:
                maps.append(cam(input_tensor=xk, targets=targets))
        return maps

    def ablation() -> Any:
        top1 = _predict_top5(s)[:1]
        with pgc.AblationCAM(model=s.model, target_layers=[s.module]) as cam:
            return cam(input_tensor=s.x1, targets=[ClassifierOutputTarget(top1[0])])

    out = [
        Workload("pgc.top5x5.loop", loop, "pytorch-grad-cam",
                 "prediction + 5 methods x 5 targets, one call per target (documented use)"),
        Workload("pgc.top5x5.batched", batched, "pytorch-grad-cam",
                 "prediction + 5 methods, the 5 targets batched (image repeated 5x)"),
    ]
    if slow_ablation:
        out.append(Workload("pgc.ablation.top1", ablation, "pytorch-grad-cam",
                            "prediction + top-1 AblationCAM (batch_size 32)",
                            max_runs=ablation_runs, warmup=False))
    return out


def captum_workloads(s: Setup) -> list[Workload]:
    from captum.attr import LayerAttribution, LayerGradCam

    size = tuple(s.x1.shape[-2:])

    def run() -> Any:
        top5 = _predict_top5(s)
        gc = LayerGradCam(s.model, s.module)
        maps = []
        for c in top5:
            a = gc.attribute(s.x1, target=c, relu_attributions=True)
            maps.append(LayerAttribution.interpolate(a, size, "bilinear"))
        return maps

    return [Workload("captum.top5.gradcam", run, "captum",
                     "prediction + top-5 x LayerGradCam (+ bilinear upsampling), call per target")]


def torchcam_workloads(s: Setup) -> list[Workload]:
    import torchcam.methods as tcm

    classes = [getattr(tcm, c) for c in TORCHCAM_METHODS.values()]

    def run() -> Any:
        extractors = [cls(s.model, s.layer) for cls in classes]
        try:
            scores = s.model(s.x1)
            top5 = scores[0].topk(5).indices.tolist()
            maps = []
            n = len(extractors) * len(top5)
            i = 0
            for ext in extractors:
                for c in top5:
                    i += 1
                    maps.append(ext(class_idx=c, scores=scores, retain_graph=i < n))
            return maps
        finally:
            for ext in extractors:
                ext.remove_hooks()

    return [Workload("torchcam.top5x4", run, "torchcam",
                     "prediction + 4 methods x 5 targets from one forward (retain_graph)")]


def build_workloads(s: Setup, peers: dict[str, str | None], slow_ablation: bool,
                    ablation_runs: int) -> list[Workload]:
    """All workloads for one model; peers whose status is a skip reason are left out."""
    out = camserve_workloads(s) + context_workloads(s)
    if peers.get("pytorch-grad-cam", "absent") is None:
        out += pgc_workloads(s, slow_ablation, ablation_runs)
    if peers.get("captum", "absent") is None:
        out += captum_workloads(s)
    if peers.get("torchcam", "absent") is None:
        out += torchcam_workloads(s)
    return out

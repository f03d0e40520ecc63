"""A real backend for the gateway tests: the engine's Explainer over a tiny GAP network.

``EngineBackend`` computes real predictions and Grad-CAM-family maps (one
batched forward and one batched backward per backend call, each item with its
own methods and targets), so batching can be checked against separate calls.
``gate`` holds backend calls until it is set (to fill queues deterministically).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from camserve.engine import Explainer
from camserve.engine.methods import METHOD_SPECS, list_methods
from camserve.errors import (
    CamserveError,
    InvalidImageError,
    InvalidRequestError,
    UnavailableError,
    UnknownNameError,
)
from camserve.gateway.proto import pb_grpc
from camserve.gateway.server import BackgroundGateway
from camserve.gateway.settings import GatewaySettings
from camserve.service import MethodDescription, ModelDescription
from camserve.service.outcomes import (
    ExplainError,
    ExplainResult,
    MapResult,
    Outcome,
    Prediction,
    TargetResult,
)
from camserve.service.request import ExplainRequest

LABELS = ("circle", "square", "triangle", "star", "cross")
SIZE = 16


class TinyGAP(nn.Module):
    """conv-relu-conv-relu, global average pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def png(seed: int, size: int = SIZE) -> bytes:
    """A random RGB image as PNG bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class EngineBackend:
    """A classifier backend computing real explanations with :class:`Explainer`."""

    device = "cpu"

    def __init__(self, name: str = "tiny") -> None:
        self.name = name
        self.model = TinyGAP().eval()
        self.layer = "features.3"
        self.explainer = Explainer(self.model, self.layer)
        self.calls: list[int] = []
        self.computed: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.down = False
        self._lock = threading.Lock()

    # --- protocol ------------------------------------------------------------
    def model_names(self) -> list[str]:
        if self.down:
            raise UnavailableError("backend down")
        return [self.name]

    def ready(self, name: str) -> bool:
        return not self.down and name == self.name

    def describe(self, name: str) -> ModelDescription:
        if name != self.name:
            raise UnknownNameError("model", name, [self.name])
        methods = tuple(
            MethodDescription(
                m,
                METHOD_SPECS[m].resolution,
                METHOD_SPECS[m].cost,
                {
                    o: tuple(t.__name__ for t in spec.types)
                    for o, spec in METHOD_SPECS[m].options.items()
                },
            )
            for m in list_methods()
        )
        return ModelDescription(
            name=self.name,
            kind="classifier",
            labels=LABELS,
            vocab=(),
            layer=self.layer,
            layers=tuple(n for n, _ in self.model.named_modules() if n),
            methods=methods,
            input_size=(3, SIZE, SIZE),
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            runtime="torch",
            device=self.device,
        )

    def run(self, requests: Sequence[ExplainRequest]) -> list[Outcome]:
        self.gate.wait(30)
        if self.down:
            raise UnavailableError("backend down")
        with self._lock:
            self.calls.append(len(requests))
            self.computed.extend(r.request_id for r in requests)
        outcomes: list[Outcome | None] = [None] * len(requests)
        good: list[tuple[int, torch.Tensor, tuple[int, int]]] = []
        for i, r in enumerate(requests):
            try:
                x, size = self._admit(r)
                good.append((i, x, size))
            except CamserveError as exc:
                outcomes[i] = ExplainError(r.request_id, r.model, exc)
        if good:
            for (i, _, _), out in zip(good, self._explain(requests, good), strict=True):
                outcomes[i] = out
        return [o for o in outcomes if o is not None]

    # --- the computation -----------------------------------------------------
    def _admit(self, r: ExplainRequest) -> tuple[torch.Tensor, tuple[int, int]]:
        if r.model != self.name:
            raise UnknownNameError("model", r.model, [self.name])
        for m in r.methods:
            if m not in METHOD_SPECS:
                raise UnknownNameError("method", m, METHOD_SPECS)
        if r.layer not in (None, self.layer):
            raise UnknownNameError("layer", r.layer, [self.layer])
        for c in r.class_ids:
            if not 0 <= c < len(LABELS):
                raise UnknownNameError("class id", c, range(len(LABELS)))
        if r.tensor is not None:
            if r.tensor.shape != (3, SIZE, SIZE):
                raise InvalidRequestError(
                    f"tensor must have shape (3, {SIZE}, {SIZE}), got {r.tensor.shape}"
                )
            return torch.from_numpy(r.tensor.copy()), (SIZE, SIZE)
        assert r.image is not None
        try:
            img = Image.open(io.BytesIO(r.image)).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidImageError(f"image: cannot decode {len(r.image)} bytes ({exc})") from exc
        size = img.size
        arr = np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), size

    def _explain(
        self, requests: Sequence[ExplainRequest], good: list[tuple[int, torch.Tensor, Any]]
    ) -> list[Outcome]:
        xs = torch.stack([x for _, x, _ in good])
        with torch.no_grad():
            logits = self.model(xs)
        probs = logits.softmax(1)
        ids: list[list[int]] = []
        for row, (i, _, _) in enumerate(good):
            r = requests[i]
            if r.class_ids:
                ids.append(list(r.class_ids))
            else:
                ids.append(probs[row].argsort(descending=True)[: r.k].tolist())
        k = max(len(t) for t in ids)
        padded = [t + [t[-1]] * (k - len(t)) for t in ids]
        methods: list[str] = []
        for i, _, _ in good:
            methods += [m for m in requests[i].methods if m not in methods]
        exp = self.explainer.explain(xs, methods=methods, targets=padded)
        out: list[Outcome] = []
        for row, (i, _, size) in enumerate(good):
            r = requests[i]
            order = probs[row].argsort(descending=True)[:3].tolist()
            targets = []
            for col, c in enumerate(ids[row]):
                maps = {}
                for m in r.methods:
                    raw = exp.map(m)[row, col]
                    data = raw if r.output == "raw" else exp.upsampled(m)[row, col]
                    maps[m] = MapResult(m, self.layer, data.detach().numpy().astype(np.float32))
                targets.append(
                    TargetResult("class", LABELS[c], float(logits[row, c]), id=c, maps=maps)
                )
            out.append(
                ExplainResult(
                    request_id=r.request_id,
                    model=self.name,
                    kind="classifier",
                    layer=self.layer,
                    score=r.score,
                    output=r.output,
                    image_size=size,
                    input_size=(SIZE, SIZE),
                    predictions=tuple(
                        Prediction(c, LABELS[c], float(probs[row, c]), float(logits[row, c]))
                        for c in order
                    ),
                    targets=() if r.predict_only else tuple(targets),
                    timings={k: float(v) for k, v in exp.timings.items()},
                    batch_size=len(requests),
                )
            )
        return out


@pytest.fixture
def backend() -> EngineBackend:
    return EngineBackend()


def stub(gw: BackgroundGateway) -> pb_grpc.ExplanationServiceStub:
    """A generated-stub client of ``gw`` on a new plaintext channel."""
    return pb_grpc.ExplanationServiceStub(grpc.insecure_channel(gw.address))


def start(backend: Any, **settings: Any) -> BackgroundGateway:
    """A gateway on a free loopback port (metrics on a free port too)."""
    base: dict[str, Any] = {"port": 0, "metrics_port": 0, "health_interval_s": 0.2, "grace_s": 5}
    base.update(settings)
    return BackgroundGateway(backend, GatewaySettings(**base)).start()


@pytest.fixture
def gateway(backend: EngineBackend) -> Iterator[BackgroundGateway]:
    gw = start(backend)
    try:
        yield gw
    finally:
        gw.stop()

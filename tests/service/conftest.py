"""Tiny models and request helpers for the service tests.

:class:`JsonRunner` is the handlers' path without TorchServe: the JSON codec
parses, the real :class:`ExplainService` answers, the codec encodes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camserve.codecs.http import encode_error, encode_outcome, parse_request
from camserve.errors import CamserveError
from camserve.service import ExplainResult, ExplainService, Settings
from camserve.service.images import InputTransform
from camserve.service.metrics import MetricSpec, MetricsSink
from camserve.service.tasks import ClassifierTask, Task

LABELS = ("red circle", "green square", "blue triangle")
SIZE = (16, 16)


class TinyGAP(nn.Module):
    """conv-relu-conv-relu, global average pooling, linear head (CAM applies)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyFC(nn.Module):
    """conv-relu, then a fully connected head on the flattened maps (CAM does not apply)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, len(LABELS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def png(seed: int = 0, size: tuple[int, int] = (20, 24)) -> bytes:
    """A random RGB PNG of (height, width) ``size``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def json_item(image: bytes, **options: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """A TorchServe-style item with a parsed JSON body."""
    return {"body": {"image": base64.b64encode(image).decode(), **options}}, {}


class RecordingSink:
    """Keeps every recorded metric value (a real sink, for assertions)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, dict[str, str]]] = []

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        self.records.append((spec.name, value, dict(labels)))


TRANSFORM = InputTransform(size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


SETTINGS = Settings(max_image_bytes=100_000, max_image_pixels=50_000)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a handler answers for one request: status, JSON body, error message."""

    status: int
    body: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


class JsonRunner:
    """The handlers' path in-process: codec -> ExplainService -> codec."""

    def __init__(self, task: Task, sink: MetricsSink | None = None) -> None:
        self.task = task
        self.service = ExplainService({task.name: task}, settings=SETTINGS, metrics=sink)

    def run(self, raws: Sequence[tuple[Any, Mapping[str, str]]]) -> list[Answer]:
        answers: list[Answer | None] = [None] * len(raws)
        requests, positions = [], []
        for i, (data, headers) in enumerate(raws):
            try:
                requests.append(parse_request(data, headers, model=self.task.name))
                positions.append(i)
            except CamserveError as exc:
                answers[i] = Answer(*_swap(encode_error(exc)))
        for i, outcome in zip(positions, self.service.run(requests), strict=True):
            if isinstance(outcome, ExplainResult):
                outcome = dataclasses.replace(outcome, batch_size=len(raws))
            answers[i] = Answer(*_swap(encode_outcome(outcome)))
        return [a for a in answers if a is not None]


def _swap(answer: tuple[int, str, str]) -> tuple[int, str, str]:
    status, message, body = answer
    return status, body, message


def tiny_task(model: nn.Module) -> ClassifierTask:
    layer = "features.3" if isinstance(model, TinyGAP) else "features.1"
    return ClassifierTask("tiny", model, LABELS, layer, TRANSFORM)


def make_runner(model: nn.Module, sink: RecordingSink | None = None) -> JsonRunner:
    return JsonRunner(tiny_task(model), sink)


@pytest.fixture
def gap_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyGAP().eval()


@pytest.fixture
def fc_model() -> nn.Module:
    torch.manual_seed(1)
    return TinyFC().eval()

"""Typed results of :meth:`camserve.service.ExplainService.run`: one outcome per request.

An outcome is an :class:`ExplainResult` or an :class:`ExplainError`; neither knows
anything of HTTP, JSON, gRPC or TorchServe. Front doors (the JSON codec of the
handlers, the gRPC gateway, the audit) turn them into their own wire formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from camserve.errors import CamserveError

__all__ = [
    "ExplainError",
    "ExplainResult",
    "MapResult",
    "ModelKind",
    "Outcome",
    "Prediction",
    "TargetKind",
    "TargetResult",
]

ModelKind = Literal["classifier", "captioner", "vqa"]
TargetKind = Literal["class", "word", "caption", "answer"]


@dataclass(frozen=True)
class Prediction:
    """One ranked output of the model: a class (classifier) or an answer (VQA).

    Attributes:
        id: the class / answer index in the model's output.
        label: its name.
        probability: its post-softmax probability in [0, 1].
        logit: its pre-softmax score (None where the response has none, e.g. VQA).
    """

    id: int
    label: str
    probability: float
    logit: float | None = None


@dataclass(frozen=True)
class MapResult:
    """One method's map for one target.

    Attributes:
        method: the method id (``gradcam``, ``guided_gradcam``, ...).
        layer: the layer the map was computed at (``"input"`` for input-space methods).
        data: float32 map: ``(h, w)`` at the layer's resolution for output ``raw``,
            ``(H, W)`` min-max normalised to [0, 1] at the model's input size for
            ``normalized``; None for ``png`` and ``box``.
        png: the heat-map overlay on the input image (output ``png``), else None.
        box: the weak-localization box ``(x0, y0, x1, y1)`` inclusive, in the
            caller's image pixels (003 eq. 3), or None when not asked for.
    """

    method: str
    layer: str
    data: np.ndarray | None = None
    png: bytes | None = None
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class TargetResult:
    """One explained score of a request, with a map per requested method.

    Attributes:
        kind: ``class`` (classifier), ``word`` (a caption word), ``caption`` (the
            whole caption) or ``answer`` (VQA).
        label: the class label, the word, the caption or the answer.
        score: the explained score (logit / probability, or log-probability for
            captions).
        id: the class / answer index (``class``, ``answer``), else None.
        position: the word's position in the caption (``word``), else None.
        maps: method id -> its map.
    """

    kind: TargetKind
    label: str
    score: float
    id: int | None = None
    position: int | None = None
    maps: Mapping[str, MapResult] = field(default_factory=dict)


@dataclass(frozen=True)
class ExplainResult:
    """The answer to one request.

    Attributes:
        request_id: the caller's id of the request (echoed).
        model: the model name; ``kind`` its kind.
        layer: the layer explained; ``score`` ``logit`` / ``probability`` /
            ``log_probability``; ``output`` the requested output form.
        image_size: ``(width, height)`` of the caller's image.
        input_size: ``(height, width)`` of the model input.
        predictions: classifiers: the top classes; VQA: the top answers.
        caption, words: captioners: the generated caption and its words.
        question, answer: VQA: the question and the model's answer.
        targets: the explained targets in response order.
        timings: seconds per stage of the request's batch (decode, forward, ...).
        batch_size: how many requests shared the batch.
    """

    request_id: str
    model: str
    kind: ModelKind
    layer: str
    score: str
    output: str
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    predictions: tuple[Prediction, ...] = ()
    caption: str | None = None
    words: tuple[str, ...] = ()
    question: str | None = None
    answer: str | None = None
    targets: tuple[TargetResult, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    batch_size: int = 1

    @property
    def ok(self) -> bool:
        """Always True (see :attr:`ExplainError.ok`)."""
        return True


@dataclass(frozen=True)
class ExplainError:
    """A request that failed: the typed error says why (the other requests are not affected).

    Attributes:
        request_id: the caller's id of the request (echoed).
        model: the model name asked for.
        error: the error; its type and message are what callers see.
    """

    request_id: str
    model: str
    error: CamserveError

    @property
    def ok(self) -> bool:
        """Always False."""
        return False


Outcome = ExplainResult | ExplainError
"""What :meth:`ExplainService.run` answers per request."""

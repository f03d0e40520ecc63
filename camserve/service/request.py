"""The transport-neutral request of :class:`camserve.service.ExplainService`.

Every front door (the JSON codec of the TorchServe handlers, the gRPC gateway,
the audit, the command line) builds an :class:`ExplainRequest`; its constructor
validates every field (types, ranges, limits) and raises
:class:`~camserve.errors.InvalidRequestError` naming the field and the value.
Checks that need the model (known layer, class ids, labels, answers, method
applicability) happen in the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_METHODS", "DEFAULT_THRESHOLD", "OUTPUTS", "SCORES", "ExplainRequest"]

DEFAULT_METHODS = ("gradcam",)
DEFAULT_THRESHOLD = 0.15
"""Weak-localization threshold: 15% of the map's maximum (003 eq. 3)."""
SCORES = ("logit", "probability")
OUTPUTS = ("raw", "normalized", "png", "box")


@dataclass(frozen=True)
class ExplainRequest:
    """One request to explain one image with one model.

    Attributes:
        model: the model name.
        image: the encoded PNG/JPEG bytes; exactly one of ``image`` and ``tensor``.
        tensor: a model input given directly: float32 ``(C, H, W)`` at the model's
            input size, already normalised (the audit's perturbed images).
        methods: method ids, in the caller's order, without duplicates.
        top_k: explain the k best classes (classifier); None when ids/labels are given.
        class_ids: class ids to explain (classifier).
        labels: class labels to explain (classifier).
        layer: the layer to explain at; None = the model's default layer.
        score: ``logit`` or ``probability`` (post-softmax, 002 footnote 1).
        output: ``raw``, ``normalized``, ``png`` or ``box``.
        threshold: weak-localization threshold as a fraction of the map's max (003).
        question: the question (VQA).
        answers: further answers to explain besides the model's own (VQA, 001 Fig. A3).
        options: per-method options (method id -> option -> value), checked
            against the engine's method registry.
        predict_only: only predictions, no maps (cheap; the audit re-scores with it).
        request_id: the caller's id, echoed in the outcome.
        deadline: ``time.monotonic()`` instant after which the request is not
            computed (None: no deadline).
    """

    model: str
    image: bytes | None = None
    tensor: np.ndarray | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    top_k: int | None = None
    class_ids: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    layer: str | None = None
    score: str = "logit"
    output: str = "normalized"
    threshold: float = DEFAULT_THRESHOLD
    question: str | None = None
    answers: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    predict_only: bool = False
    request_id: str = ""
    deadline: float | None = None

    @property
    def k(self) -> int:
        """Top-k to use when no explicit targets are named (default 1)."""
        return 1 if self.top_k is None else self.top_k

"""The transport-neutral request of :class:`camserve.service.ExplainService`.

Every front door (the JSON codec of the TorchServe handlers, the gRPC gateway,
the audit, the command line) builds an :class:`ExplainRequest`; its constructor
validates every field (types, ranges, limits) and raises
:class:`~camserve.errors.InvalidRequestError` naming the field and the value.
Checks that need the model (known layer, class ids, labels, answers, method
applicability) happen in the service.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from camserve.engine.methods import method_spec
from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.service.settings import DEFAULT_MAX_METHODS, DEFAULT_MAX_TARGETS

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_THRESHOLD",
    "MAX_CLASS_ID",
    "MAX_LAYER_CHARS",
    "MAX_TEXT_CHARS",
    "OUTPUTS",
    "SCORES",
    "ExplainRequest",
]

DEFAULT_METHODS = ("gradcam",)
DEFAULT_THRESHOLD = 0.15
"""Weak-localization threshold: 15% of the map's maximum (003 eq. 3)."""
SCORES = ("logit", "probability")
OUTPUTS = ("raw", "normalized", "png", "box")
MAX_CLASS_ID = 2**31 - 1
MAX_LAYER_CHARS = 200
"""Longest layer path (and model name, request id)."""
MAX_TEXT_CHARS = 500
"""Longest question, label or answer."""


@dataclass(frozen=True)
class ExplainRequest:
    """One request to explain one image with one model.

    The constructor validates every field (types, ranges, and the default limits
    of :class:`~camserve.service.settings.Settings`: at most 8 methods and 20
    targets) and normalises sequences to tuples; checks that need the model
    happen in the service.

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
        boxes: compute the weak-localization box of every map (always done for
            output ``box``); False saves the connected-components pass.
        request_id: the caller's id, echoed in the outcome.
        deadline: ``time.monotonic()`` instant after which the request is not
            computed (None: no deadline).

    Raises:
        InvalidRequestError: a field of the wrong type, out of its range or over
            a limit; the message names the field and the value.
        UnknownNameError: an unknown method, option or choice.
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
    boxes: bool = True
    request_id: str = ""
    deadline: float | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def k(self) -> int:
        """Top-k to use when no explicit targets are named (default 1)."""
        return 1 if self.top_k is None else self.top_k


def _set(req: ExplainRequest, name: str, value: object) -> None:
    object.__setattr__(req, name, value)  # normalising a frozen dataclass's own field


def _text(name: str, value: object, max_len: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip() or len(value) > max_len:
        raise InvalidRequestError(f"{name} must have 1 to {max_len} characters, got {value!r}")
    return value


def _texts(name: str, value: object, max_len: int = MAX_TEXT_CHARS) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidRequestError(f"{name} must be a sequence of strings, got {value!r}")
    out: list[str] = []
    for v in value:
        t = _text(name, v, max_len)
        if t not in out:
            out.append(t)
    return tuple(out)


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise InvalidRequestError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value)


def _check_options(req: ExplainRequest) -> None:
    if not isinstance(req.options, Mapping):
        raise InvalidRequestError(f"options must be a mapping, got {type(req.options).__name__}")
    checked: dict[str, Mapping[str, Any]] = {}
    for method, opts in req.options.items():
        if not isinstance(method, str):
            raise InvalidRequestError(f"options: method ids are strings, got {method!r}")
        spec = method_spec(method)
        if not isinstance(opts, Mapping):
            raise InvalidRequestError(
                f"options[{method!r}] must be a mapping, got {type(opts).__name__}"
            )
        for name, value in opts.items():
            if name not in spec.options:
                raise UnknownNameError(
                    "option", f"{method}.{name}", [f"{method}.{n}" for n in spec.options]
                )
            spec.options[name].check(method, name, value)
        checked[method] = dict(opts)
    _set(req, "options", checked)  # a copy: the caller's mapping may change later


def _check_tensor(tensor: object) -> None:
    if not isinstance(tensor, np.ndarray):
        raise InvalidRequestError(f"tensor must be a numpy array, got {type(tensor).__name__}")
    if tensor.dtype != np.float32:
        raise InvalidRequestError(f"tensor must be float32, got {tensor.dtype}")
    if tensor.ndim != 3 or tensor.shape[0] < 1 or min(tensor.shape) < 1:
        raise InvalidRequestError(f"tensor must be (C, H, W), got shape {tuple(tensor.shape)}")
    if not np.isfinite(tensor).all():
        raise InvalidRequestError("tensor has NaN or infinite values")


def _validate(req: ExplainRequest) -> None:
    _text("model", req.model, MAX_LAYER_CHARS)
    if req.image is None and req.tensor is None:
        raise InvalidRequestError("the request has no image: give image (PNG/JPEG) or tensor")
    if req.image is not None and req.tensor is not None:
        raise InvalidRequestError("give either image or tensor, not both")
    if req.image is not None:
        if not isinstance(req.image, bytes | bytearray | memoryview):
            raise InvalidRequestError(f"image must be bytes, got {type(req.image).__name__}")
        if not isinstance(req.image, bytes):
            _set(req, "image", bytes(req.image))
    if req.tensor is not None:
        _check_tensor(req.tensor)

    methods = _texts("methods", req.methods, MAX_LAYER_CHARS)
    if not methods:
        raise InvalidRequestError("methods is empty: name at least one method")
    if len(methods) > DEFAULT_MAX_METHODS:
        raise InvalidRequestError(
            f"at most {DEFAULT_MAX_METHODS} methods per request, got {len(methods)}"
        )
    for m in methods:
        method_spec(m)  # UnknownNameError listing the valid ids
    _set(req, "methods", methods)

    if req.top_k is not None:
        _int("top_k", req.top_k, 1, DEFAULT_MAX_TARGETS)
    if isinstance(req.class_ids, str) or not isinstance(req.class_ids, list | tuple):
        raise InvalidRequestError(
            f"class_ids must be a sequence of integers, got {req.class_ids!r}"
        )
    ids: list[int] = []
    for c in req.class_ids:
        i = _int("class_ids", c, 0, MAX_CLASS_ID)
        if i not in ids:
            ids.append(i)
    _set(req, "class_ids", tuple(ids))
    _set(req, "labels", _texts("labels", req.labels))
    if req.top_k is not None and (req.class_ids or req.labels):
        raise InvalidRequestError("give either top_k or class_ids/labels, not both")
    if len(req.class_ids) + len(req.labels) > DEFAULT_MAX_TARGETS:
        raise InvalidRequestError(f"at most {DEFAULT_MAX_TARGETS} targets per request")
    _set(req, "answers", _texts("answers", req.answers))
    if len(req.answers) > DEFAULT_MAX_TARGETS:
        raise InvalidRequestError(f"at most {DEFAULT_MAX_TARGETS} answers per request")

    if req.layer is not None:
        _text("layer", req.layer, MAX_LAYER_CHARS)
    if req.score not in SCORES:
        raise UnknownNameError("score", req.score, SCORES)
    if req.output not in OUTPUTS:
        raise UnknownNameError("output", req.output, OUTPUTS)
    t = req.threshold
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise InvalidRequestError(f"threshold must be a number, got {t!r}")
    if not 0.0 < t <= 1.0:
        raise InvalidRequestError(f"threshold must be in (0.0, 1.0], got {t!r}")
    _set(req, "threshold", float(t))
    if req.question is not None:
        _text("question", req.question, MAX_TEXT_CHARS)
    _check_options(req)
    if not isinstance(req.predict_only, bool):
        raise InvalidRequestError(f"predict_only must be a boolean, got {req.predict_only!r}")
    if not isinstance(req.boxes, bool):
        raise InvalidRequestError(f"boxes must be a boolean, got {req.boxes!r}")
    if not isinstance(req.request_id, str) or len(req.request_id) > MAX_LAYER_CHARS:
        raise InvalidRequestError(
            f"request_id must be a string of at most {MAX_LAYER_CHARS} characters, "
            f"got {req.request_id!r}"
        )
    d = req.deadline
    if d is not None and (
        isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d)
    ):
        raise InvalidRequestError(f"deadline must be a time.monotonic() instant, got {d!r}")

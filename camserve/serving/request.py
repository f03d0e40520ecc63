"""The request side of the wire format, shared by the TorchServe handlers and the gateway.

A request is either

* a JSON object: ``{"image": "<base64 PNG/JPEG>", "methods": [...], ...}``, or
* a raw PNG/JPEG body with the options in the query string (``?methods=gradcam,gradcampp``)
  or in headers named ``X-Camserve-<Option>`` (``X-Camserve-Methods: gradcam``).

JSON fields win over query parameters, which win over headers. See the README for
the full schema.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from camserve.errors import InvalidRequestError

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_THRESHOLD",
    "HEADER_PREFIX",
    "MAX_METHODS",
    "MAX_TARGETS",
    "OPTIONS",
    "OUTPUTS",
    "SCORES",
    "ExplainRequest",
    "parse_request",
]

DEFAULT_METHODS = ("gradcam",)
DEFAULT_THRESHOLD = 0.15
"""Weak-localization threshold: 15% of the map's maximum (003 eq. 3)."""
SCORES = ("logit", "probability")
OUTPUTS = ("raw", "normalized", "png", "box")
MAX_METHODS = 8
MAX_TARGETS = 20
HEADER_PREFIX = "x-camserve-"
OPTIONS = (
    "methods",
    "top_k",
    "class_ids",
    "labels",
    "layer",
    "score",
    "output",
    "threshold",
    "question",
    "answers",
)
_IMAGE_KEYS = ("image",)
_BODY_KEYS = ("body", "data")


@dataclass(frozen=True)
class ExplainRequest:
    """One caller's request, validated for types and ranges (not yet against a model).

    Attributes:
        image: the encoded PNG/JPEG bytes.
        methods: method ids, in the caller's order, without duplicates.
        top_k: explain the k best classes (classifier); None when ids/labels are given.
        class_ids: class ids to explain (classifier).
        labels: class labels to explain (classifier), resolved against the model's labels.
        layer: the layer to explain at; None = the model's default layer.
        score: ``logit`` or ``probability`` (post-softmax, 002 footnote 1).
        output: ``raw`` (layer resolution), ``normalized`` (min-max, input size),
            ``png`` (overlay) or ``box`` (the box only).
        threshold: weak-localization threshold as a fraction of the map's max (003).
        question: the question (VQA).
        answers: further answers to explain besides the model's own (VQA, 001 Fig. A3).
    """

    image: bytes
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

    @property
    def k(self) -> int:
        """Top-k to use when no explicit targets are named (default 1)."""
        return 1 if self.top_k is None else self.top_k


def _text(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError("an option value is not valid UTF-8") from exc
    return value


def _str_list(name: str, value: object) -> tuple[str, ...]:
    value = _text(value)
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")] if value.strip() else []
    elif isinstance(value, list | tuple):
        items = []
        for v in value:
            if not isinstance(v, str):
                raise InvalidRequestError(
                    f"{name} must be a list of strings; got an item of type {type(v).__name__}"
                )
            items.append(v.strip())
    else:
        raise InvalidRequestError(
            f"{name} must be a list of strings or a comma-separated string, "
            f"got {type(value).__name__}"
        )
    out: list[str] = []
    for v in items:
        if not v:
            raise InvalidRequestError(f"{name} contains an empty name")
        if v not in out:
            out.append(v)
    return tuple(out)


def _int(name: str, value: object, lo: int, hi: int) -> int:
    value = _text(value)
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got a boolean")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError as exc:
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}") from exc
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _int_list(name: str, value: object) -> tuple[int, ...]:
    value = _text(value)
    if isinstance(value, str):
        raw: Sequence[object] = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        raw = [value]
    elif isinstance(value, list | tuple):
        raw = value
    else:
        raise InvalidRequestError(
            f"{name} must be a list of integers or a comma-separated string, "
            f"got {type(value).__name__}"
        )
    out: list[int] = []
    for v in raw:
        i = _int(name, v, 0, 2**31 - 1)
        if i not in out:
            out.append(i)
    return tuple(out)


_ALIASES = {"normalised": "normalized", "prob": "probability", "probabilities": "probability"}


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    value = _text(value)
    key = value.strip().lower() if isinstance(value, str) else None
    key = _ALIASES.get(key, key) if key is not None else None
    if key is None or key not in choices:
        raise InvalidRequestError(f"unknown {name} {value!r}; valid {name}s: {', '.join(choices)}")
    return key


def _float(name: str, value: object, lo: float, hi: float) -> float:
    value = _text(value)
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(f) or not lo < f <= hi:
        raise InvalidRequestError(f"{name} must be in ({lo}, {hi}], got {value!r}")
    return f


def _string(name: str, value: object, max_len: int = 500) -> str:
    value = _text(value)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value or len(value) > max_len:
        raise InvalidRequestError(f"{name} must have 1 to {max_len} characters")
    return value


def _image_from_json(value: object) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequestError(f"image must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"image is not valid base64: {exc}") from exc


def _looks_like_json(body: bytes) -> bool:
    return body.lstrip()[:1] == b"{"


def _options_from(source: Mapping[str, Any]) -> dict[str, object]:
    """Options among query parameters / gRPC input fields (other keys are ignored)."""
    options: dict[str, object] = {}
    for key, value in source.items():
        k = key.lower().replace("-", "_")
        if k in OPTIONS:
            options[k] = value
    return options


def parse_request(
    data: Mapping[str, Any] | bytes | str,
    headers: Mapping[str, str] | None = None,
) -> ExplainRequest:
    """Parses one request from the body, query parameters and headers.

    Args:
        data: either the raw body, or TorchServe's per-request mapping (the body
            under ``body`` or ``data``; query parameters and gRPC input fields as
            further keys). A JSON body may already be parsed into a dict.
        headers: request headers; ``X-Camserve-<option>`` ones are read.

    Raises:
        InvalidRequestError: missing image, bad JSON, a wrong type or range, an
            unknown field or choice (the message names the value and the choices).
    """
    fields: Mapping[str, Any] = data if isinstance(data, Mapping) else {"body": data}
    body: object = None
    body_key = None
    for key in _BODY_KEYS:
        if key in fields and fields[key] is not None:
            body, body_key = fields[key], key
            break
    options: dict[str, object] = {}
    for hk, hv in (headers or {}).items():
        if hk.lower().startswith(HEADER_PREFIX):
            name = hk[len(HEADER_PREFIX) :].lower().replace("-", "_")
            if name in OPTIONS:
                options[name] = hv
    params = {k: v for k, v in fields.items() if k != body_key}
    options.update(_options_from(params))

    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, bytes) and _looks_like_json(body):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequestError("a JSON body must be an object")
    if isinstance(body, dict):
        unknown = [k for k in body if k not in _IMAGE_KEYS and k not in OPTIONS]
        if unknown:
            raise InvalidRequestError(
                f"unknown field {unknown[0]!r}; valid fields: image, {', '.join(OPTIONS)}"
            )
        if "image" not in body:
            raise InvalidRequestError("the JSON body has no 'image' field (base64 PNG/JPEG)")
        image = _image_from_json(body["image"])
        options.update({k: v for k, v in body.items() if k in OPTIONS and v is not None})
    elif isinstance(body, bytes):
        image = body
    elif body is None:
        raise InvalidRequestError("the request has no body: send a PNG/JPEG or a JSON object")
    else:
        raise InvalidRequestError(
            f"the request body must be an image or a JSON object, got {type(body).__name__}"
        )
    return _build(image, options)


def _build(image: bytes, options: Mapping[str, object]) -> ExplainRequest:
    methods = _str_list("methods", options["methods"]) if "methods" in options else DEFAULT_METHODS
    if not methods:
        raise InvalidRequestError("methods is empty: name at least one method")
    if len(methods) > MAX_METHODS:
        raise InvalidRequestError(f"at most {MAX_METHODS} methods per request, got {len(methods)}")
    class_ids = _int_list("class_ids", options["class_ids"]) if "class_ids" in options else ()
    labels = _str_list("labels", options["labels"]) if "labels" in options else ()
    top_k = _int("top_k", options["top_k"], 1, MAX_TARGETS) if "top_k" in options else None
    if top_k is not None and (class_ids or labels):
        raise InvalidRequestError("give either top_k or class_ids/labels, not both")
    if len(class_ids) + len(labels) > MAX_TARGETS:
        raise InvalidRequestError(f"at most {MAX_TARGETS} targets per request")
    answers = _str_list("answers", options["answers"]) if "answers" in options else ()
    if len(answers) > MAX_TARGETS:
        raise InvalidRequestError(f"at most {MAX_TARGETS} answers per request")
    return ExplainRequest(
        image=image,
        methods=methods,
        top_k=top_k,
        class_ids=class_ids,
        labels=labels,
        layer=_string("layer", options["layer"], 200) if "layer" in options else None,
        score=_choice("score", options["score"], SCORES) if "score" in options else "logit",
        output=(
            _choice("output", options["output"], OUTPUTS) if "output" in options else "normalized"
        ),
        threshold=(
            _float("threshold", options["threshold"], 0.0, 1.0)
            if "threshold" in options
            else DEFAULT_THRESHOLD
        ),
        question=_string("question", options["question"]) if "question" in options else None,
        answers=answers,
    )

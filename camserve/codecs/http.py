"""The HTTP/JSON codec of the TorchServe handlers: wire format <-> the service's types.

A request is either

* a JSON object: ``{"image": "<base64 PNG/JPEG>", "methods": [...], ...}`` (or, in
  place of ``image``, a model input ``"tensor": {"shape": [C, H, W], "dtype":
  "float32", "data": "<base64 little-endian float32, row-major>"}``), or
* a raw PNG/JPEG body with the options in the query string (``?methods=gradcam,gradcampp``)
  or in headers named ``X-Camserve-<Option>`` (``X-Camserve-Methods: gradcam``).

JSON fields win over query parameters, which win over headers. See the README for
the full schema. :func:`parse_request` turns one into an
:class:`~camserve.service.ExplainRequest`.

An answer is compact JSON (:func:`encode_outcome`). A map is sent as
``{"shape": [h, w], "dtype": "float32", "data": "<base64 little-endian float32,
row-major>"}`` (``raw``: at the layer's resolution; ``normalized``: min-max
normalised to [0, 1] and upsampled to the model's input size), or as
``{"format": "png", "data": "<base64 PNG>"}`` (a heat-map overlay on the input
image), or not at all (``box``). Every map entry carries ``box``: the
weak-localization box (003 eq. 3) in the caller's image pixels. Errors answer
their HTTP status from :data:`HTTP_STATUS` with
``{"error": {"type", "status", "message"}}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from camserve.errors import (
    CamserveError,
    DeadlineExceededError,
    ImageTooLargeError,
    InternalError,
    InvalidRequestError,
    ModelFailureError,
    OverloadedError,
    UnavailableError,
)
from camserve.service.outcomes import (
    ExplainError,
    ExplainResult,
    MapResult,
    ModelKind,
    Outcome,
    Prediction,
    TargetResult,
)
from camserve.service.request import (
    DEFAULT_METHODS,
    DEFAULT_THRESHOLD,
    OUTPUTS,
    SCORES,
    ExplainRequest,
)
from camserve.service.settings import DEFAULT_MAX_METHODS as MAX_METHODS
from camserve.service.settings import DEFAULT_MAX_TARGETS as MAX_TARGETS

__all__ = [
    "HEADER_PREFIX",
    "HTTP_STATUS",
    "OPTIONS",
    "decode_error",
    "decode_map",
    "decode_outcome",
    "dumps",
    "encode_error",
    "encode_json_request",
    "encode_outcome",
    "http_status",
    "parse_request",
    "spliced",
]

HTTP_STATUS: dict[type[CamserveError], int] = {
    CamserveError: 500,
    InvalidRequestError: 400,
    ImageTooLargeError: 413,
    ModelFailureError: 500,
    InternalError: 500,
    OverloadedError: 503,
    UnavailableError: 503,
    DeadlineExceededError: 504,
}
"""Error type -> HTTP status; a subclass takes its nearest listed ancestor's."""

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
    "options",
    "predict_only",
)
_IMAGE_KEYS = ("image", "tensor")
_BODY_KEYS = ("body", "data")


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


def _image_from_json(value: object, name: str = "image") -> bytes:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"{name} is not valid base64: {exc}") from exc


def _bool(name: str, value: object) -> bool:
    value = _text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUTH:
        return _TRUTH[value.strip().lower()]
    raise InvalidRequestError(f"{name} must be true or false, got {value!r}")


_TRUTH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _tensor_from_json(value: object) -> np.ndarray:
    """A model input ``{"shape": [C, H, W], "dtype": "float32", "data": "<base64>"}``."""
    if not isinstance(value, dict) or not {"shape", "data"} <= set(value):
        raise InvalidRequestError(
            'tensor must be an object {"shape": [C, H, W], "dtype": "float32", "data": base64}'
        )
    dtype = value.get("dtype", "float32")
    if dtype != "float32":
        raise InvalidRequestError(f"tensor dtype must be 'float32', got {dtype!r}")
    shape = value["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise InvalidRequestError(f"tensor shape must be [C, H, W] of positive ints, got {shape!r}")
    raw = _image_from_json(value["data"], "tensor data")
    count = shape[0] * shape[1] * shape[2]
    if len(raw) != 4 * count:
        raise InvalidRequestError(
            f"tensor data has {len(raw)} bytes; shape {shape} of float32 needs {4 * count}"
        )
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)


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
    *,
    model: str,
    request_id: str = "",
) -> ExplainRequest:
    """Parses one request from the body, query parameters and headers.

    Args:
        model: the model the request is for (TorchServe's model name).
        request_id: the caller's id of the request.
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
                f"unknown field {unknown[0]!r}; valid fields: image, tensor, {', '.join(OPTIONS)}"
            )
        if "image" in body and "tensor" in body:
            raise InvalidRequestError("give either image or tensor, not both")
        if "image" not in body and "tensor" not in body:
            raise InvalidRequestError(
                "the JSON body has no 'image' field (base64 PNG/JPEG) nor a 'tensor'"
            )
        options.update({k: v for k, v in body.items() if k in OPTIONS and v is not None})
        if "tensor" in body:
            return _build(None, options, model, request_id, _tensor_from_json(body["tensor"]))
        image = _image_from_json(body["image"])
    elif isinstance(body, bytes):
        image = body
    elif body is None:
        raise InvalidRequestError("the request has no body: send a PNG/JPEG or a JSON object")
    else:
        raise InvalidRequestError(
            f"the request body must be an image or a JSON object, got {type(body).__name__}"
        )
    return _build(image, options, model, request_id)


def _method_options(value: object) -> dict[str, dict[str, Any]]:
    value = _text(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"options is not a JSON object: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise InvalidRequestError(
            f"options must map method ids to objects of options, got {value!r}"
        )
    return value


def _build(
    image: bytes | None,
    options: Mapping[str, object],
    model: str,
    request_id: str,
    tensor: np.ndarray | None = None,
) -> ExplainRequest:
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
        model=model,
        request_id=request_id,
        image=image,
        tensor=tensor,
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
        options=_method_options(options["options"]) if "options" in options else {},
        predict_only=(
            _bool("predict_only", options["predict_only"]) if "predict_only" in options else False
        ),
    )


class Spliced:
    """A base64 string that :func:`dumps` writes verbatim, without scanning it for escapes.

    Scanning a 22 KB map for characters to escape costs more than the rest of a
    response's JSON; base64 has none. Build one only with :func:`spliced`.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def spliced(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` (from :func:`encode_map`) with its base64 ``data`` marked for :func:`dumps`."""
    data = entry.get("data")
    if isinstance(data, str):
        entry["data"] = Spliced(data)
    return entry


_NONCE = secrets.token_hex(16)
_MARK = json.dumps(_NONCE)


def _plain(obj: Any) -> str:
    if isinstance(obj, Spliced):
        return obj.text
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(payload: Any) -> str:
    """Compact JSON (no spaces; NaN and inf are refused); :class:`Spliced` strings as strings."""
    blobs: list[str] = []

    def mark(obj: Any) -> str:
        if isinstance(obj, Spliced):
            blobs.append(obj.text)
            return _NONCE
        return _plain(obj)

    out = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=mark)
    if not blobs:
        return out
    parts = out.split(_MARK)
    if len(parts) != len(blobs) + 1:  # the random marker also occurs in the payload's text
        return json.dumps(payload, separators=(",", ":"), allow_nan=False, default=_plain)
    pieces = [parts[0]]
    for blob, part in zip(blobs, parts[1:], strict=True):
        pieces += ['"', blob, '"', part]
    return "".join(pieces)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _float_map(m: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(m, dtype="<f4")
    return {"shape": list(arr.shape), "dtype": "float32", "data": _b64(arr.tobytes())}


def decode_map(entry: Mapping[str, Any]) -> np.ndarray:
    """Inverse of the float32 encoding: the map as a NumPy array (for clients and tests)."""
    raw = base64.b64decode(entry["data"])
    return np.frombuffer(raw, dtype="<f4").reshape(entry["shape"])


def http_status(error: CamserveError) -> int:
    """The HTTP status of an error (:data:`HTTP_STATUS`, by its nearest listed class)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def encode_error(error: CamserveError) -> tuple[int, str, str]:
    """(HTTP status, message, JSON body) for a per-request error."""
    status = http_status(error)
    message = str(error)
    body = dumps({"error": {"type": type(error).__name__, "status": status, "message": message}})
    return status, message, body


def encode_map(entry: MapResult) -> dict[str, Any]:
    """One map entry of the response (see the module docstring); base64 data spliced."""
    if entry.png is not None:
        out: dict[str, Any] = {"format": "png", "data": Spliced(_b64(entry.png))}
    elif entry.data is not None:
        out = _float_map(entry.data)
        out["data"] = Spliced(out["data"])
    else:
        out = {}
    if entry.box is not None:
        out["box"] = list(entry.box)
    return out


def _target(t: TargetResult) -> dict[str, Any]:
    score = round(t.score, 6)
    if t.kind == "word":
        head: dict[str, Any] = {"word": t.label, "position": t.position, "score": score}
    elif t.kind == "caption":
        head = {"caption": t.label, "score": score}
    elif t.kind == "answer":
        head = {"answer": t.label, "score": score}
    else:
        head = {"id": t.id, "label": t.label, "score": score}
    head["maps"] = {m: encode_map(e) for m, e in t.maps.items()}
    return head


def _head(res: ExplainResult) -> dict[str, Any]:
    if res.kind == "captioner":
        return {"caption": res.caption, "words": list(res.words)}
    if res.kind == "vqa":
        return {
            "question": res.question,
            "answer": res.answer,
            "answers": [
                {"answer": p.label, "probability": round(p.probability, 6)} for p in res.predictions
            ],
        }
    preds = []
    for p in res.predictions:
        entry: dict[str, Any] = {
            "id": p.id,
            "label": p.label,
            "probability": round(p.probability, 6),
        }
        if p.logit is not None:
            entry["logit"] = round(p.logit, 6)
        preds.append(entry)
    return {"predictions": preds}


def encode_result(res: ExplainResult) -> str:
    """The compact JSON answer to one request (the README's response format)."""
    payload = {
        "model": res.model,
        "layer": res.layer,
        "score": res.score,
        "output": res.output,
        "image_size": list(res.image_size),
        "input_size": list(res.input_size),
        **_head(res),
        "explanations": [_target(t) for t in res.targets],
        "timings": {k: round(v, 6) for k, v in res.timings.items()},
        "batch_size": res.batch_size,
    }
    return dumps(payload)


def encode_outcome(outcome: Outcome) -> tuple[int, str, str]:
    """(HTTP status, error message or ``""``, JSON body) of one outcome."""
    if isinstance(outcome, ExplainError):
        return encode_error(outcome.error)
    return 200, "", encode_result(outcome)


# --- the other direction: what a client of the handlers sends and reads -------------
def encode_json_request(request: ExplainRequest) -> bytes:
    """The JSON request body for a request (what :func:`parse_request` reads back)."""
    body: dict[str, Any] = {}
    if request.tensor is not None:
        body["tensor"] = _float_map(request.tensor)  # the maps' float32 encoding
    else:
        assert request.image is not None  # the request's constructor checked it
        body["image"] = _b64(request.image)
    body["methods"] = list(request.methods)
    body["score"] = request.score
    body["output"] = request.output
    body["threshold"] = request.threshold
    if request.predict_only:
        body["predict_only"] = True
    if request.top_k is not None:
        body["top_k"] = request.top_k
    if request.class_ids:
        body["class_ids"] = list(request.class_ids)
    if request.labels:
        body["labels"] = list(request.labels)
    if request.layer:
        body["layer"] = request.layer
    if request.question is not None:
        body["question"] = request.question
    if request.answers:
        body["answers"] = list(request.answers)
    if request.options:
        body["options"] = {m: dict(o) for m, o in request.options.items()}
    return json.dumps(body, separators=(",", ":")).encode()


_ERRORS_BY_STATUS: dict[int, type[CamserveError]] = {
    400: InvalidRequestError,
    413: ImageTooLargeError,
    503: OverloadedError,
    504: DeadlineExceededError,
}


def decode_error(payload: Mapping[str, Any]) -> CamserveError:
    """The error of an ``{"error": {"type", "status", "message"}}`` answer (by its status)."""
    err = payload["error"]
    kind = _ERRORS_BY_STATUS.get(int(err.get("status", 500)), ModelFailureError)
    return kind(str(err.get("message", "")))


def _decoded_map(entry: Mapping[str, Any], method: str, layer: str) -> MapResult:
    box = entry.get("box")
    return MapResult(
        method=method,
        layer=layer,
        data=decode_map(entry).astype(np.float32) if "shape" in entry else None,
        png=base64.b64decode(entry["data"]) if entry.get("format") == "png" else None,
        box=(int(box[0]), int(box[1]), int(box[2]), int(box[3])) if box is not None else None,
    )


def _decoded_target(
    e: Mapping[str, Any], layer: str, input_methods: frozenset[str], labels: Sequence[str]
) -> TargetResult:
    maps = {
        m: _decoded_map(entry, m, "input" if m in input_methods else layer)
        for m, entry in e.get("maps", {}).items()
    }
    score = float(e["score"])
    if "word" in e:
        return TargetResult("word", e["word"], score, position=int(e["position"]), maps=maps)
    if "caption" in e:
        return TargetResult("caption", e["caption"], score, maps=maps)
    if "answer" in e:
        ids = list(labels)
        answer_id = ids.index(e["answer"]) if e["answer"] in ids else None
        return TargetResult("answer", e["answer"], score, id=answer_id, maps=maps)
    return TargetResult("class", e["label"], score, id=int(e["id"]), maps=maps)


def decode_outcome(
    text: str | bytes,
    request: ExplainRequest,
    *,
    labels: Sequence[str] = (),
    input_methods: frozenset[str] = frozenset(),
) -> Outcome:
    """The typed outcome of a JSON answer (the inverse of :func:`encode_outcome`).

    The JSON rounds scores and probabilities to 6 decimals; maps are exact.

    Args:
        text: the JSON answer (a result or an ``{"error": ...}`` object).
        request: the request it answers (its ``request_id`` and model are echoed).
        labels: the model's labels (VQA answers get their ids from them).
        input_methods: methods whose maps are at the input resolution (their
            map layer is ``input``).

    Raises:
        ValueError, KeyError, TypeError: not an answer of this format.
    """
    payload = json.loads(text)
    if "error" in payload:
        return ExplainError(request.request_id, request.model, decode_error(payload))
    layer = str(payload["layer"])
    kind: ModelKind = "classifier"
    if "caption" in payload:
        kind = "captioner"
    elif "question" in payload:
        kind = "vqa"
    if kind == "vqa":
        ids = list(labels)
        predictions = tuple(
            Prediction(ids.index(a["answer"]) if a["answer"] in ids else -1, a["answer"],
                       float(a["probability"]))
            for a in payload.get("answers", [])
        )  # fmt: skip
    else:
        predictions = tuple(
            Prediction(int(p["id"]), p["label"], float(p["probability"]),
                       float(p["logit"]) if p.get("logit") is not None else None)
            for p in payload.get("predictions", [])
        )  # fmt: skip
    width, height = payload["image_size"]
    in_h, in_w = payload["input_size"]
    return ExplainResult(
        request_id=request.request_id,
        model=request.model,
        kind=kind,
        layer=layer,
        score=str(payload["score"]),
        output=str(payload["output"]),
        image_size=(int(width), int(height)),
        input_size=(int(in_h), int(in_w)),
        predictions=predictions,
        caption=payload.get("caption"),
        words=tuple(payload.get("words", ())),
        question=payload.get("question"),
        answer=payload.get("answer"),
        targets=tuple(
            _decoded_target(e, layer, input_methods, labels)
            for e in payload.get("explanations", [])
        ),
        timings={k: float(v) for k, v in payload.get("timings", {}).items()},
        batch_size=int(payload.get("batch_size", 1)),
    )

"""Protobuf messages <-> the service's typed requests, outcomes and model descriptions.

The server uses ``request_from_proto``, ``response_of`` and ``model_info_of``;
the client uses the inverses (``request_to_proto``, ``result_from_proto``,
``description_from_proto``). Maps travel as packed little-endian float32 with
their shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from camserve.errors import InvalidRequestError
from camserve.gateway.proto import pb
from camserve.service import MethodDescription, ModelDescription
from camserve.service.outcomes import (
    ExplainResult,
    MapResult,
    ModelKind,
    Prediction,
    TargetKind,
    TargetResult,
)
from camserve.service.request import DEFAULT_METHODS, DEFAULT_THRESHOLD, ExplainRequest

__all__ = [
    "description_from_proto",
    "model_info_of",
    "request_from_proto",
    "request_to_proto",
    "response_of",
    "result_from_proto",
    "tensor_of",
    "unpack_tensor",
]

_SCORES: dict[int, str] = {
    pb.SCORE_UNSPECIFIED: "logit",
    pb.SCORE_LOGIT: "logit",
    pb.SCORE_PROBABILITY: "probability",
    pb.SCORE_LOG_PROBABILITY: "log_probability",
}
_SCORE_ENUM = {
    "logit": pb.SCORE_LOGIT,
    "probability": pb.SCORE_PROBABILITY,
    "log_probability": pb.SCORE_LOG_PROBABILITY,
}
_OUTPUTS: dict[int, str] = {
    pb.OUTPUT_UNSPECIFIED: "normalized",
    pb.OUTPUT_RAW: "raw",
    pb.OUTPUT_NORMALIZED: "normalized",
    pb.OUTPUT_PNG: "png",
    pb.OUTPUT_BOX: "box",
}
_OUTPUT_ENUM: dict[str, pb.Output.ValueType] = {
    "raw": pb.OUTPUT_RAW,
    "normalized": pb.OUTPUT_NORMALIZED,
    "png": pb.OUTPUT_PNG,
    "box": pb.OUTPUT_BOX,
}
_KINDS: dict[str, pb.ModelKind.ValueType] = {
    "classifier": pb.MODEL_KIND_CLASSIFIER,
    "captioner": pb.MODEL_KIND_CAPTIONER,
    "vqa": pb.MODEL_KIND_VQA,
}
_KIND_NAMES: dict[int, ModelKind] = {
    pb.MODEL_KIND_CLASSIFIER: "classifier",
    pb.MODEL_KIND_CAPTIONER: "captioner",
    pb.MODEL_KIND_VQA: "vqa",
}
_TARGETS: dict[str, pb.TargetKind.ValueType] = {
    "class": pb.TARGET_KIND_CLASS,
    "word": pb.TARGET_KIND_WORD,
    "caption": pb.TARGET_KIND_CAPTION,
    "answer": pb.TARGET_KIND_ANSWER,
}
_TARGET_NAMES: dict[int, TargetKind] = {
    pb.TARGET_KIND_CLASS: "class",
    pb.TARGET_KIND_WORD: "word",
    pb.TARGET_KIND_CAPTION: "caption",
    pb.TARGET_KIND_ANSWER: "answer",
}
_DTYPES = {"float32": np.dtype("<f4")}


# ----------------------------------------------------------------------------- tensors
def tensor_of(array: np.ndarray) -> pb.Tensor:
    """Packs an array as little-endian float32 with its shape."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(data.shape), dtype="float32", data=data.tobytes())


def unpack_tensor(tensor: pb.Tensor, field: str = "tensor") -> np.ndarray:
    """The float32 array of a packed tensor (a copy, native byte order).

    Raises:
        InvalidRequestError: an unknown dtype, a negative dimension, or a data
            length that does not match the shape (the message names ``field``).
    """
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidRequestError(
            f"{field}.dtype must be one of {sorted(_DTYPES)}, got {tensor.dtype!r}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"{field}.shape must not be negative, got {list(shape)}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidRequestError(
            f"{field}.data has {len(tensor.data)} bytes; shape {list(shape)} of "
            f"{tensor.dtype} needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(np.float32)


# ----------------------------------------------------------------------------- requests
def _option_value(value: pb.OptionValue, field: str) -> Any:
    which = value.WhichOneof("kind")
    if which is None:
        raise InvalidRequestError(f"{field} has no value")
    return getattr(value, which)


def _enum(table: Mapping[int, str], value: int, field: str) -> str:
    name = table.get(value)
    if name is None:
        raise InvalidRequestError(f"{field} must be one of {sorted(table)}, got {value}")
    return name


def request_from_proto(msg: pb.ExplainRequest, deadline: float | None = None) -> ExplainRequest:
    """The service's request for a protobuf request.

    Args:
        msg: the request.
        deadline: the call's ``time.monotonic()`` deadline, or None.

    Raises:
        InvalidRequestError: a field the service cannot take (the message names it
            and its value); the service checks the rest.
    """
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("one of image and tensor is required, got neither")
    score = _enum(_SCORES, msg.score, "score")
    if score == "log_probability":
        raise InvalidRequestError(
            "score must be SCORE_LOGIT or SCORE_PROBABILITY, got SCORE_LOG_PROBABILITY"
        )
    options = {
        method: {
            name: _option_value(v, f"options[{method!r}][{name!r}]")
            for name, v in opts.values.items()
        }
        for method, opts in msg.options.items()
    }
    return ExplainRequest(
        model=msg.model,
        image=msg.image if which == "image" else None,
        tensor=unpack_tensor(msg.tensor) if which == "tensor" else None,
        methods=tuple(msg.methods) or DEFAULT_METHODS,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        class_ids=tuple(int(c) for c in msg.class_ids),
        labels=tuple(msg.labels),
        layer=msg.layer or None,
        score=score,
        output=_enum(_OUTPUTS, msg.output, "output"),
        threshold=msg.threshold if msg.HasField("threshold") else DEFAULT_THRESHOLD,
        question=msg.question or None,
        answers=tuple(msg.answers),
        options=options,
        predict_only=msg.predict_only,
        request_id=msg.request_id,
        deadline=deadline,
    )


def _option_proto(value: Any) -> pb.OptionValue:
    if isinstance(value, bool):
        return pb.OptionValue(bool_value=value)
    if isinstance(value, int):
        return pb.OptionValue(int_value=value)
    if isinstance(value, float):
        return pb.OptionValue(double_value=value)
    if isinstance(value, str):
        return pb.OptionValue(string_value=value)
    raise InvalidRequestError(f"option values must be bool, int, float or str, got {value!r}")


def request_to_proto(request: ExplainRequest) -> pb.ExplainRequest:
    """The protobuf form of a request (the client's side; the deadline goes with the call)."""
    msg = pb.ExplainRequest(
        request_id=request.request_id,
        model=request.model,
        methods=list(request.methods),
        class_ids=list(request.class_ids),
        labels=list(request.labels),
        layer=request.layer or "",
        score=_SCORE_ENUM[request.score],
        output=_OUTPUT_ENUM[request.output],
        threshold=request.threshold,
        question=request.question or "",
        answers=list(request.answers),
        predict_only=request.predict_only,
    )
    if request.image is not None:
        msg.image = request.image
    elif request.tensor is not None:
        msg.tensor.CopyFrom(tensor_of(request.tensor))
    if request.top_k is not None:
        msg.top_k = request.top_k
    for method, opts in request.options.items():
        for name, value in opts.items():
            msg.options[method].values[name].CopyFrom(_option_proto(value))
    return msg


# ----------------------------------------------------------------------------- responses
def _map_proto(m: MapResult) -> pb.Map:
    out = pb.Map(method=m.method, layer=m.layer)
    if m.data is not None:
        out.data.CopyFrom(tensor_of(m.data))
    if m.png is not None:
        out.png = m.png
    if m.box is not None:
        x0, y0, x1, y1 = m.box
        out.box.CopyFrom(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return out


def response_of(
    result: ExplainResult, timings: Mapping[str, float] | None = None
) -> pb.ExplainResponse:
    """The protobuf response of a result.

    Args:
        result: the service's result.
        timings: further stage timings of the gateway (``queue``), merged in.
    """
    width, height = result.image_size
    in_h, in_w = result.input_size
    msg = pb.ExplainResponse(
        request_id=result.request_id,
        model=result.model,
        kind=_KINDS[result.kind],
        layer=result.layer,
        score=_SCORE_ENUM.get(result.score, pb.SCORE_UNSPECIFIED),
        output=_OUTPUT_ENUM.get(result.output, pb.OUTPUT_UNSPECIFIED),
        image_size=pb.ImageSize(width=width, height=height),
        input_size=pb.ImageSize(width=in_w, height=in_h),
        caption=result.caption or "",
        words=list(result.words),
        question=result.question or "",
        answer=result.answer or "",
        batch_size=result.batch_size,
    )
    for p in result.predictions:
        pred = msg.predictions.add(id=p.id, label=p.label, probability=p.probability)
        if p.logit is not None:
            pred.logit = p.logit
    for t in result.targets:
        target = msg.targets.add(kind=_TARGETS[t.kind], label=t.label, score=t.score)
        if t.id is not None:
            target.id = t.id
        if t.position is not None:
            target.position = t.position
        target.maps.extend(_map_proto(m) for m in t.maps.values())
    msg.timings.update(result.timings)
    if timings:
        msg.timings.update(timings)
    return msg


def result_from_proto(msg: pb.ExplainResponse) -> ExplainResult:
    """The typed result of a protobuf response (the client's side)."""
    targets = []
    for t in msg.targets:
        maps = {}
        for m in t.maps:
            maps[m.method] = MapResult(
                method=m.method,
                layer=m.layer,
                data=unpack_tensor(m.data, "data") if m.HasField("data") else None,
                png=m.png or None,
                box=(m.box.x0, m.box.y0, m.box.x1, m.box.y1) if m.HasField("box") else None,
            )
        targets.append(
            TargetResult(
                kind=_TARGET_NAMES[t.kind],
                label=t.label,
                score=t.score,
                id=t.id if t.HasField("id") else None,
                position=t.position if t.HasField("position") else None,
                maps=maps,
            )
        )
    return ExplainResult(
        request_id=msg.request_id,
        model=msg.model,
        kind=_KIND_NAMES[msg.kind],
        layer=msg.layer,
        score=_SCORES[msg.score],
        output=_OUTPUTS[msg.output],
        image_size=(msg.image_size.width, msg.image_size.height),
        input_size=(msg.input_size.height, msg.input_size.width),
        predictions=tuple(
            Prediction(
                id=p.id,
                label=p.label,
                probability=p.probability,
                logit=p.logit if p.HasField("logit") else None,
            )
            for p in msg.predictions
        ),
        caption=msg.caption or None,
        words=tuple(msg.words),
        question=msg.question or None,
        answer=msg.answer or None,
        targets=tuple(targets),
        timings=dict(msg.timings),
        batch_size=msg.batch_size,
    )


# ----------------------------------------------------------------------------- models
def model_info_of(d: ModelDescription) -> pb.ModelInfo:
    """The protobuf form of a model description."""
    channels, height, width = d.input_size
    return pb.ModelInfo(
        name=d.name,
        kind=_KINDS[d.kind],
        labels=list(d.labels),
        vocabulary=list(d.vocab),
        layers=list(d.layers),
        default_layer=d.layer,
        methods=[
            pb.MethodInfo(
                id=m.id,
                resolution=m.resolution,
                cost=m.cost,
                options=[pb.OptionInfo(name=o, types=list(t)) for o, t in m.options.items()],
            )
            for m in d.methods
        ],
        input_size=pb.ImageSize(width=width, height=height),
        input_channels=channels,
        mean=list(d.mean),
        std=list(d.std),
        runtime=d.runtime,
        device=d.device,
    )


def _triple(values: Sequence[float], default: float) -> tuple[float, float, float]:
    a, b, c = (list(values) + [default] * 3)[:3]
    return (a, b, c)


def description_from_proto(msg: pb.ModelInfo) -> ModelDescription:
    """The model description of a protobuf ``ModelInfo`` (the client's side)."""
    return ModelDescription(
        name=msg.name,
        kind=_KIND_NAMES[msg.kind],
        labels=tuple(msg.labels),
        vocab=tuple(msg.vocabulary),
        layer=msg.default_layer,
        layers=tuple(msg.layers),
        methods=tuple(
            MethodDescription(
                id=m.id,
                resolution=m.resolution,
                cost=m.cost,
                options={o.name: tuple(o.types) for o in m.options},
            )
            for m in msg.methods
        ),
        input_size=(msg.input_channels, msg.input_size.height, msg.input_size.width),
        mean=_triple(msg.mean, 0.0),
        std=_triple(msg.std, 1.0),
        runtime=msg.runtime,
        device=msg.device,
    )

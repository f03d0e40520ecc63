"""Turns a batch of requests into as few engine calls as possible, and back.

Items that agree on the engine call (same layer, score and kind of targets, see
:meth:`Task.group_key`) share one forward and one backward: the union of their
methods is computed, their targets are padded to a common count, and the results
are sliced back per item. Every item gets either a response or its own typed
error; one bad item never fails the others (a group whose engine call fails is
re-run item by item to find the culprit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from camserve.engine import Explanation, list_methods
from camserve.engine.maps import localization_box
from camserve.errors import CamserveError, InvalidRequestError, UnknownNameError
from camserve.serving.images import DecodedImage, ImageLimits, InputTransform, decode_image
from camserve.serving.metrics import MetricsSink, NullMetrics, record_batch
from camserve.serving.request import ExplainRequest, parse_request
from camserve.serving.response import dumps, encode_error, encode_map, scale_box, spliced

__all__ = [
    "EXPENSIVE_METHODS",
    "BatchRunner",
    "EngineCall",
    "Item",
    "ItemResult",
    "RawItem",
    "Target",
    "Task",
]

log = logging.getLogger(__name__)

EXPENSIVE_METHODS = frozenset(
    {"ablationcam", "scorecam", "occlusion", "integrated_gradients", "gradient_shap"}
)
"""Methods that re-run the network; items only share a call if they all ask for the same ones."""

RawItem = tuple[Any, Mapping[str, str]]
"""One incoming request: (TorchServe's data mapping or the body, its headers)."""


@dataclass
class Item:
    """A request that passed the model-independent checks, with its decoded image."""

    request: ExplainRequest
    image: DecodedImage
    x: torch.Tensor
    resized: np.ndarray
    layer: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One explained score of an item: its column in the engine's output and its description."""

    column: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class EngineCall:
    """What the engine is asked for one group: inputs, targets and score."""

    inputs: torch.Tensor | tuple[torch.Tensor, ...]
    targets: Any
    score: str = "logit"
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemResult:
    """The answer to one item: HTTP status, JSON body, and the error message if any."""

    status: int
    body: str
    message: str = ""

    @property
    def ok(self) -> bool:
        """True for a 200 answer."""
        return self.status == 200


class Task(Protocol):
    """What differs between the classifier, the captioner and the VQA model."""

    name: str
    transform: InputTransform
    default_layer: str

    def explainer(self, layer: str) -> Any:
        """The engine :class:`~camserve.engine.Explainer` for this layer (cached)."""

    def prepare(self, item: Item) -> None:
        """Checks the item against the model (targets, question...), filling ``item.extra``."""

    def group_key(self, item: Item) -> Hashable:
        """Items with equal keys share one engine call (layer and score are added by the runner)."""

    def call(self, items: Sequence[Item]) -> EngineCall:
        """The engine call for a group (may run the model, e.g. to generate captions)."""

    def describe(
        self, exp: Explanation, row: int, item: Item
    ) -> tuple[dict[str, Any], list[Target]]:
        """The item's head of the response (predictions, caption, answer) and its targets."""


def _methods_check(methods: Sequence[str], known: frozenset[str]) -> None:
    for m in methods:
        if m not in known:
            raise UnknownNameError("method", m, known)


def _map_of(exp: Explanation, method: str, layer: str) -> tuple[str, torch.Tensor]:
    if method in exp.maps.get(layer, {}):
        return layer, exp.maps[layer][method]
    if method in exp.maps.get("input", {}):
        return "input", exp.maps["input"][method]
    raise InvalidRequestError(f"the engine returned no {method!r} map at layer {layer!r}")


def _host(maps: torch.Tensor) -> torch.Tensor:
    return maps.detach().to("cpu", torch.float32).contiguous()


class BatchRunner:
    """Answers a batch of raw requests for one model.

    Args:
        task: the model-specific part.
        limits: image caps.
        metrics: where stage, method and request metrics go.
        options: engine options passed to every call (e.g. occlusion mask size).
    """

    def __init__(
        self,
        task: Task,
        limits: ImageLimits | None = None,
        metrics: MetricsSink | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.task = task
        self.limits = limits or ImageLimits()
        self.metrics: MetricsSink = metrics or NullMetrics()
        self.options = dict(options or {})
        self._known = frozenset(list_methods())

    # --- per item --------------------------------------------------------------
    def _admit(self, raw: RawItem) -> Item:
        data, headers = raw
        request = parse_request(data, headers)
        _methods_check(request.methods, self._known)
        image = decode_image(request.image, self.limits)
        layer = request.layer or self.task.default_layer
        self.task.explainer(layer)  # unknown layer -> UnknownNameError for this item only
        resized = self.task.transform.resized(image)
        x = self.task.transform.normalize(resized)  # resized once, not twice
        item = Item(request=request, image=image, x=x, resized=resized, layer=layer)
        self.task.prepare(item)
        return item

    def _key(self, item: Item) -> Hashable:
        expensive = frozenset(item.request.methods) & EXPENSIVE_METHODS
        return (
            item.layer,
            item.request.score,
            self.task.group_key(item),
            frozenset(item.request.methods) if expensive else None,
        )

    # --- per group -------------------------------------------------------------
    def _explain(self, items: Sequence[Item]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        layer = items[0].layer
        methods: list[str] = []
        for it in items:
            methods += [m for m in it.request.methods if m not in methods]
        call = self.task.call(items)
        explainer = self.task.explainer(layer)
        with torch.inference_mode(False), torch.enable_grad():
            exp = explainer.explain(
                call.inputs,
                methods=tuple(methods),
                targets=call.targets,
                score=call.score,
                options=self.options,
            )
        upsampled: dict[str, torch.Tensor] = {}
        raws: dict[str, torch.Tensor] = {}
        for m in methods:  # the engine adds the time to timings["upsample"]
            key, raws[m] = _map_of(exp, m, layer)
            upsampled[m] = exp.upsampled(m, key)
        t0 = time.perf_counter()
        # One host copy per method for the whole batch, not one per item and target.
        upsampled = {m: _host(t) for m, t in upsampled.items()}
        raws = {m: _host(t) for m, t in raws.items()}
        payloads: list[dict[str, Any]] = []
        for row, it in enumerate(items):
            head, targets = self.task.describe(exp, row, it)
            in_size = (int(it.x.shape[-2]), int(it.x.shape[-1]))
            explanations = []
            for target in targets:
                maps = {}
                for m in it.request.methods:
                    norm = upsampled[m][row, target.column]
                    box = scale_box(
                        localization_box(norm, it.request.threshold), in_size, it.image.size
                    )
                    maps[m] = spliced(
                        encode_map(
                            it.request.output, raws[m][row, target.column], norm, box, it.resized
                        )
                    )
                explanations.append({**target.meta, "maps": maps})
            payloads.append(
                {
                    "model": self.task.name,
                    "layer": layer,
                    "score": call.score,
                    "output": it.request.output,
                    "image_size": list(it.image.size),
                    "input_size": list(in_size),
                    **head,
                    "explanations": explanations,
                }
            )
        timings = {k: float(v) for k, v in exp.timings.items() if k != "total"}
        timings.update(call.timings)
        timings["encode"] = time.perf_counter() - t0
        return payloads, timings

    # --- the batch -------------------------------------------------------------
    def run(self, raws: Sequence[RawItem]) -> list[ItemResult]:
        """Answers every request: one :class:`ItemResult` per input, in order."""
        start = time.perf_counter()
        results: list[ItemResult | None] = [None] * len(raws)
        payloads: list[dict[str, Any] | None] = [None] * len(raws)
        errors: list[str] = ["ok"] * len(raws)
        groups: dict[Hashable, list[int]] = {}
        items: dict[int, Item] = {}
        t0 = time.perf_counter()
        for i, raw in enumerate(raws):
            try:
                items[i] = self._admit(raw)
                groups.setdefault(self._key(items[i]), []).append(i)
            except CamserveError as exc:
                results[i] = self._error(exc)
                errors[i] = type(exc).__name__
            except Exception:
                log.exception("admitting request %d of %d failed", i, len(raws))
                results[i] = self._internal()
                errors[i] = "InternalError"
        timings: dict[str, float] = {"decode": time.perf_counter() - t0}

        def add(t: Mapping[str, float]) -> None:
            for k, v in t.items():
                timings[k] = timings.get(k, 0.0) + v

        for idx in groups.values():
            self._run_group(idx, items, payloads, results, errors, add)

        for i, p in enumerate(payloads):
            if p is not None:
                p["timings"] = {k: round(v, 6) for k, v in timings.items()}
                p["batch_size"] = len(raws)
                results[i] = ItemResult(200, dumps(p))
        total = time.perf_counter() - start
        timings["total"] = total
        record_batch(self.metrics, self.task.name, timings, [(e, total) for e in errors])
        return [r if r is not None else self._internal() for r in results]

    def _run_group(
        self,
        idx: list[int],
        items: Mapping[int, Item],
        payloads: list[dict[str, Any] | None],
        results: list[ItemResult | None],
        errors: list[str],
        add: Callable[[Mapping[str, float]], None],
    ) -> None:
        try:
            out, t = self._explain([items[i] for i in idx])
        except CamserveError as exc:
            if len(idx) > 1:  # find the item(s) at fault; the others still answer
                for i in idx:
                    self._run_group([i], items, payloads, results, errors, add)
                return
            results[idx[0]] = self._error(exc)
            errors[idx[0]] = type(exc).__name__
            return
        except Exception:
            log.exception("explaining a group of %d failed", len(idx))
            for i in idx:
                results[i] = self._internal()
                errors[i] = "InternalError"
            return
        add(t)
        for i, p in zip(idx, out, strict=True):
            payloads[i] = p

    @staticmethod
    def _error(exc: CamserveError) -> ItemResult:
        status, message, body = encode_error(exc)
        return ItemResult(status, body, message)

    @staticmethod
    def _internal() -> ItemResult:
        message = "internal error while explaining this request"
        body = dumps({"error": {"type": "InternalError", "status": 500, "message": message}})
        return ItemResult(500, body, message)

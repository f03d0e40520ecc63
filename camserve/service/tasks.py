"""The model-specific parts of the service: what to explain and how to describe it.

A task checks a request against its model (class ids and labels, questions),
builds a group's engine call, and describes each item's result (predictions,
caption, answer) with the targets whose maps go into the result. No method
logic lives here (that is the engine's) and nothing of any wire format. This
module holds the classifier's task and what every task shares; the captioner's
and the VQA model's are in :mod:`camserve.service.text_tasks`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine import Explainer, Explanation
from camserve.engine.layout import Layout
from camserve.engine.methods import list_methods
from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.models import ExplainerFactory, LayerExplainer
from camserve.service.images import InputTransform
from camserve.service.outcomes import ModelKind, Prediction, TargetResult
from camserve.service.request import ExplainRequest

__all__ = [
    "ClassifierTask",
    "EngineCall",
    "ExplainerCache",
    "Item",
    "Target",
    "Task",
    "TaskBase",
    "refuse",
    "stack_inputs",
    "top_predictions",
]


@dataclass
class Item:
    """A request admitted for one model, with its model input.

    Attributes:
        request: the request.
        x: the model input, float32 ``(3, H, W)``, normalised.
        resized: the image resized to the input size, uint8 ``(H, W, 3)`` (None
            for tensor input).
        image_size: ``(width, height)`` of the caller's image (the input size for
            tensor input).
        layer: the layer to explain.
        started: ``time.perf_counter()`` when the request's work began.
        extra: what the task keeps between :meth:`Task.prepare` and :meth:`Task.describe`.
    """

    request: ExplainRequest
    x: Tensor
    resized: np.ndarray | None
    image_size: tuple[int, int]
    layer: str
    started: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One explained score of an item: its column in the engine's output and its description."""

    column: int
    result: TargetResult


@dataclass(frozen=True)
class EngineCall:
    """What the engine is asked for one group: inputs, targets and score."""

    inputs: Tensor | tuple[Tensor, ...]
    targets: Any
    score: str = "logit"
    timings: Mapping[str, float] = field(default_factory=dict)


class Task(Protocol):
    """What differs between the classifier, the captioner and the VQA model."""

    name: str
    kind: ModelKind
    model: nn.Module
    transform: InputTransform
    default_layer: str

    @property
    def device(self) -> torch.device:
        """Where the model runs."""

    @property
    def runtime(self) -> str:
        """``torch``, or ``onnx`` (onnxruntime at the default layer)."""

    @property
    def runtime_device(self) -> torch.device:
        """Where the runtime serving the default layer computes (its ``device``)."""

    def explainer(self, layer: str) -> LayerExplainer:
        """The explainer for this layer (cached): the engine's, or the model's runtime's."""

    def layers(self) -> list[str]:
        """The layers that can be explained (``named_modules()`` paths)."""

    def prepare(self, item: Item) -> None:
        """Checks the item against the model (targets, question...), filling ``item.extra``."""

    def group_key(self, item: Item) -> Hashable:
        """Items with equal keys share one engine call (the service adds layer, score, cost)."""

    def call(self, items: Sequence[Item]) -> EngineCall:
        """The engine call for a group (may run the model, e.g. to generate captions)."""

    def describe(
        self, exp: Explanation, row: int, item: Item
    ) -> tuple[dict[str, Any], list[Target]]:
        """The item's :class:`ExplainResult` fields (predictions, caption...) and its targets."""

    def predict(self, items: Sequence[Item]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Predictions only (no maps): per item its result fields, and the stage timings."""


class ExplainerCache:
    """One :class:`Explainer` per requested layer of a model, built on first use (thread-safe).

    Args:
        model: the model (in eval mode).
        device: where inputs go (default: the model's parameters' device).
        layout: how every explained layer's output is read as activations
            ``(N, C, h, w)`` (``"auto"``, ``"channels_first"``,
            ``"channels_last"``, a :class:`~camserve.engine.layout.TokenGrid`;
            see :mod:`camserve.engine.layout`).
        name: the served model's name (the engine's errors name it).
        explainer_factory: turns the engine's explainer of a layer into the one
            that serves it (see :attr:`camserve.models.LoadedModel.explainer_factory`);
            None: the engine's.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        *,
        layout: Layout = "auto",
        name: str | None = None,
        explainer_factory: ExplainerFactory | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        self.name = name
        self.explainer_factory = explainer_factory
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = input_dtype(model)
        self._explainers: dict[str, LayerExplainer] = {}
        self.layers = sorted(name for name, _ in model.named_modules() if name)
        self._known = frozenset(self.layers)
        self.torch_free = False
        self._lock = threading.Lock()

    def get(self, layer: str) -> LayerExplainer:
        """The explainer for ``layer`` (a module path as in ``named_modules()``).

        Raises:
            UnknownNameError: no such module (the message lists the valid ones).
        """
        with self._lock:
            ex = self._explainers.get(layer)
            if ex is None:
                if layer not in self._known:
                    raise UnknownNameError("layer", layer, self._known)
                if self.torch_free and self.explainer_factory is not None:
                    ex = self.explainer_factory(None)  # the runtime alone, no torch engine
                else:
                    engine = Explainer(
                        self.model, layer, device=self.device, layout=self.layout, name=self.name
                    )
                    ex = (
                        engine
                        if self.explainer_factory is None
                        else self.explainer_factory(engine)
                    )
                self._explainers[layer] = ex
            return ex

    def without_torch_model(self, layers: Sequence[str]) -> None:
        """The model is a runtime's stand-in: only ``layers``, each served by the factory alone."""
        with self._lock:
            self.torch_free = True
            self.layers = sorted(layers)
            self._known = frozenset(self.layers)
            self._explainers.clear()


def top_predictions(
    probabilities: Tensor, logits: Tensor | None, labels: Sequence[str], k: int
) -> tuple[Prediction, ...]:
    """The k most probable classes of one row (probabilities and logits ``(C,)``)."""
    k = min(k, probabilities.shape[-1])
    probs, ids = torch.topk(probabilities.detach().float(), k)
    row = None if logits is None else logits.detach().tolist()  # one copy, not k
    return tuple(
        Prediction(id=c, label=labels[c], probability=p, logit=None if row is None else row[c])
        for p, c in zip(probs.tolist(), ids.tolist(), strict=True)
    )


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's image input must have: its first floating parameter's (or buffer's).

    float32 for a model without floating-point parameters or buffers. The service
    casts its float32 inputs to it, so a bfloat16 or float16 model gets inputs it
    can run (maps stay float32).
    """
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def stack_inputs(items: Sequence[Item], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The items' float32 inputs as one batch ``(N, 3, H, W)`` on the model's device and dtype."""
    return torch.stack([it.x for it in items]).to(device=device, dtype=dtype)


def refuse(item: Item, fields: Sequence[str], kind: str) -> None:
    """Raises InvalidRequestError if the request sets a field that does not apply to ``kind``."""
    req = item.request
    given = {
        "top_k": req.top_k is not None,
        "class_ids": bool(req.class_ids),
        "labels": bool(req.labels),
        "question": req.question is not None,
        "answers": bool(req.answers),
    }
    for name in fields:
        if given[name]:
            raise InvalidRequestError(f"{name} does not apply to a {kind} model")


class TaskBase:
    """What every task shares: the model, its device and its explainers."""

    name: str
    model: nn.Module
    default_layer: str
    _cache: ExplainerCache
    _runtime: str = "torch"

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._cache.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's image input (see :func:`input_dtype`)."""
        return self._cache.dtype

    @property
    def runtime(self) -> str:
        """``torch``, or ``onnx`` (onnxruntime at the default layer)."""
        return self._runtime

    @property
    def runtime_device(self) -> torch.device:
        """The ``device`` of the default layer's explainer (onnxruntime's, or the engine's)."""
        if self._runtime == "torch":
            return self.device
        return self._cache.get(self.default_layer).device

    def serve_with(
        self,
        runtime: str,
        explainer_factory: ExplainerFactory | None,
        layers: Sequence[str] | None = None,
    ) -> None:
        """Serves the layers through ``explainer_factory`` (a model's runtime, e.g. onnx).

        Args:
            runtime: the runtime's name.
            explainer_factory: see :class:`ExplainerCache`.
            layers: for a model without a torch model, the only layers (the
                runtime's); None: every named module of the model.
        """
        self._runtime = runtime
        self._cache.explainer_factory = explainer_factory
        if layers is not None:
            self._cache.without_torch_model(layers)

    def method_ids(self) -> list[str]:
        """The method ids the model answers: all the engine's, unless a runtime serves it
        without a torch model (then its explainer's ``supported_methods()``)."""
        if not self._cache.torch_free:
            return list_methods()  # the torch engine answers whatever the runtime cannot
        supported = getattr(self.explainer(self.default_layer), "supported_methods", None)
        return list(supported()) if callable(supported) else list_methods()

    def explainer(self, layer: str) -> LayerExplainer:
        """The explainer for ``layer``."""
        return self._cache.get(layer)

    def layers(self) -> list[str]:
        """The model's named modules."""
        return list(self._cache.layers)

    @property
    def layout(self) -> Layout:
        """How the explained layers' outputs are read (see :mod:`camserve.engine.layout`)."""
        return self._cache.layout


class ClassifierTask(TaskBase):
    """An image classifier: predictions, and maps for the top-k or the named classes.

    Args:
        name: the model name.
        model: the classifier, output ``(N, C)`` logits.
        labels: the C class labels.
        layer: the default layer to explain at.
        transform: the model's input transform.
        device: where to run (default: the model's).
        predictions: how many predictions every result lists (at least k).
        layout: how the explained layers' outputs are read (see :class:`ExplainerCache`).
    """

    kind: ModelKind = "classifier"

    def __init__(
        self,
        name: str,
        model: nn.Module,
        labels: Sequence[str],
        layer: str,
        transform: InputTransform,
        device: torch.device | str | None = None,
        predictions: int = 5,
        layout: Layout = "auto",
    ) -> None:
        self.name = name
        self.model = model
        self.labels = list(labels)
        self.default_layer = layer
        self.transform = transform
        self.n_predictions = predictions
        self._cache = ExplainerCache(model, device, layout=layout, name=name)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def prepare(self, item: Item) -> None:
        """Resolves labels and checks class ids; stores the item's targets."""
        refuse(item, ("question", "answers"), "classifier")
        req = item.request
        ids: list[int] = []
        n = len(self.labels)
        for c in req.class_ids:
            if c >= n:
                raise UnknownNameError("class", c, range(n))
            ids.append(c)
        for label in req.labels:
            if label not in self._index:
                raise UnknownNameError("label", label, self.labels)
            if self._index[label] not in ids:
                ids.append(self._index[label])
        item.extra["ids"] = tuple(ids)
        item.extra["k"] = min(req.k, n)

    def group_key(self, item: Item) -> Hashable:
        """Top-k items and named-class items need different engine targets."""
        return "ids" if item.extra["ids"] else "topk"

    def call(self, items: Sequence[Item]) -> EngineCall:
        """One call: the top max-k classes, or every item's ids padded to a common count."""
        x = stack_inputs(items, self.device, self.dtype)
        score = items[0].request.score
        if not items[0].extra["ids"]:
            return EngineCall(x, max(int(it.extra["k"]) for it in items), score)
        width = max(len(it.extra["ids"]) for it in items)
        padded = [
            list(it.extra["ids"]) + [it.extra["ids"][-1]] * (width - len(it.extra["ids"]))
            for it in items
        ]
        return EngineCall(x, padded, score)

    def _head(self, probs: Tensor, logits: Tensor | None, n_targets: int) -> dict[str, Any]:
        k = max(self.n_predictions, n_targets)
        return {"predictions": top_predictions(probs, logits, self.labels, k)}

    def describe(
        self, exp: Explanation, row: int, item: Item
    ) -> tuple[dict[str, Any], list[Target]]:
        """Predictions of the row and one target per requested class."""
        probs = exp.probabilities
        logits = exp.logits
        if probs is None:
            raise InvalidRequestError(f"model {self.name!r} must output (N, C) logits")
        n_targets = len(item.extra["ids"]) or int(item.extra["k"])
        head = self._head(probs[row], None if logits is None else logits[row], n_targets)
        ids = exp.target_ids[row, :n_targets].tolist()
        scores = exp.target_scores[row, :n_targets].detach().tolist()
        targets = [
            Target(col, TargetResult(kind="class", label=self.labels[c], score=s, id=c))
            for col, (c, s) in enumerate(zip(ids, scores, strict=True))
        ]
        return head, targets

    def predict(self, items: Sequence[Item]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """The top classes of every item."""
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.model(stack_inputs(items, self.device, self.dtype)).float()
        probs = F.softmax(logits, dim=-1)
        heads = [
            self._head(probs[i], logits[i], len(it.extra["ids"]) or int(it.extra["k"]))
            for i, it in enumerate(items)
        ]
        return heads, {"forward": time.perf_counter() - t0}

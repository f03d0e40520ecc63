"""The model-specific parts of serving: what to explain and how to describe it.

A task validates an item against its model (class ids and labels, questions),
builds the group's engine call, and describes each item's result (predictions,
caption, answer) with the targets whose maps go into the response. No method
logic lives here: that is the engine's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn

from camserve.engine import Explainer, Explanation
from camserve.errors import UnknownNameError
from camserve.serving.batch import EngineCall, Item, Target
from camserve.serving.images import InputTransform

__all__ = ["ClassifierTask", "ExplainerCache", "top_predictions"]


class ExplainerCache:
    """One :class:`Explainer` per requested layer of a model, built on first use.

    Args:
        model: the model (in eval mode).
        device: where inputs go (default: the model's parameters' device).
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        self.model = model
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self._explainers: dict[str, Explainer] = {}
        self._layers = frozenset(name for name, _ in model.named_modules() if name)

    def get(self, layer: str) -> Explainer:
        """The explainer for ``layer`` (a module path as in ``named_modules()``)."""
        ex = self._explainers.get(layer)
        if ex is None:
            if layer not in self._layers:
                raise UnknownNameError("layer", layer, self._layers)
            ex = Explainer(self.model, layer, device=self.device)
            self._explainers[layer] = ex
        return ex


def top_predictions(
    probabilities: torch.Tensor, logits: torch.Tensor | None, labels: Sequence[str], k: int
) -> list[dict[str, Any]]:
    """The k most probable classes of one row: id, label, probability (and logit)."""
    k = min(k, probabilities.shape[-1])
    probs, ids = torch.topk(probabilities.detach().float(), k)
    row = None if logits is None else logits.detach().tolist()  # one copy, not k
    out = []
    for p, c in zip(probs.tolist(), ids.tolist(), strict=True):
        entry: dict[str, Any] = {"id": c, "label": labels[c], "probability": round(p, 6)}
        if row is not None:
            entry["logit"] = round(row[c], 6)
        out.append(entry)
    return out


class ClassifierTask:
    """An image classifier: predictions, and maps for the top-k or the named classes.

    Args:
        name: the model name (metrics label, response field).
        model: the classifier, output (N, C) logits.
        labels: the C class labels.
        layer: the default layer to explain at.
        transform: the model's input transform.
        device: where to run (default: the model's).
        predictions: how many predictions every response lists (at least k).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        labels: Sequence[str],
        layer: str,
        transform: InputTransform,
        device: torch.device | str | None = None,
        predictions: int = 5,
    ) -> None:
        self.name = name
        self.model = model
        self.labels = list(labels)
        self.default_layer = layer
        self.transform = transform
        self.n_predictions = predictions
        self._cache = ExplainerCache(model, device)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def explainer(self, layer: str) -> Explainer:
        """The explainer for ``layer``."""
        return self._cache.get(layer)

    def prepare(self, item: Item) -> None:
        """Resolves labels and checks class ids; stores the item's targets."""
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
        x = torch.stack([it.x for it in items]).to(self._cache.device)
        score = items[0].request.score
        if not items[0].extra["ids"]:
            return EngineCall(x, max(int(it.extra["k"]) for it in items), score)
        width = max(len(it.extra["ids"]) for it in items)
        padded = [
            list(it.extra["ids"]) + [it.extra["ids"][-1]] * (width - len(it.extra["ids"]))
            for it in items
        ]
        return EngineCall(x, padded, score)

    def describe(
        self, exp: Explanation, row: int, item: Item
    ) -> tuple[dict[str, Any], list[Target]]:
        """Predictions of the row and one target per requested class."""
        probs = exp.probabilities
        logits = exp.logits
        if probs is None:
            raise RuntimeError("a classifier must output (N, C) logits")
        n_targets = len(item.extra["ids"]) or int(item.extra["k"])
        head = {
            "predictions": top_predictions(
                probs[row],
                None if logits is None else logits[row],
                self.labels,
                max(self.n_predictions, n_targets),
            )
        }
        ids = exp.target_ids[row, :n_targets].tolist()
        scores = exp.target_scores[row, :n_targets].detach().tolist()
        targets = [
            Target(col, {"id": c, "label": self.labels[c], "score": round(s, 6)})
            for col, (c, s) in enumerate(zip(ids, scores, strict=True))
        ]
        return head, targets

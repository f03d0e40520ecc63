"""The model-specific parts of the service: what to explain and how to describe it.

A task checks a request against its model (class ids and labels, questions),
builds a group's engine call, and describes each item's result (predictions,
caption, answer) with the targets whose maps go into the result. No method
logic lives here (that is the engine's) and nothing of any wire format.

Captioning (001 sec. 2.2): the caption is generated greedily, then explained with
teacher forcing: one target per word (its log-probability at its position) plus
one for the whole caption (the sum), all from one forward and one backward
(001 Fig. A2). VQA (001 sec. 2.3): one target for the model's answer plus one per
answer the caller names, e.g. "why green and not yellow" (001 Fig. A3). Score
functions take ``rows`` (the engine's index of the source image of each output
row) so that re-running methods explain every variant with its own targets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine import Explainer, Explanation
from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.service.images import InputTransform
from camserve.service.outcomes import ModelKind, Prediction, TargetResult
from camserve.service.request import ExplainRequest

__all__ = [
    "CaptionTask",
    "ClassifierTask",
    "EngineCall",
    "ExplainerCache",
    "Item",
    "Target",
    "Task",
    "VQATask",
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

    def explainer(self, layer: str) -> Explainer:
        """The engine :class:`~camserve.engine.Explainer` for this layer (cached)."""

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
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        self.model = model
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self._explainers: dict[str, Explainer] = {}
        self.layers = sorted(name for name, _ in model.named_modules() if name)
        self._known = frozenset(self.layers)
        self._lock = threading.Lock()

    def get(self, layer: str) -> Explainer:
        """The explainer for ``layer`` (a module path as in ``named_modules()``).

        Raises:
            UnknownNameError: no such module (the message lists the valid ones).
        """
        with self._lock:
            ex = self._explainers.get(layer)
            if ex is None:
                if layer not in self._known:
                    raise UnknownNameError("layer", layer, self._known)
                ex = Explainer(self.model, layer, device=self.device)
                self._explainers[layer] = ex
            return ex


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


def _stack(items: Sequence[Item], device: torch.device) -> Tensor:
    return torch.stack([it.x for it in items]).to(device)


def _refuse(item: Item, fields: Sequence[str], kind: str) -> None:
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


class _Base:
    name: str
    model: nn.Module
    _cache: ExplainerCache

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._cache.device

    def explainer(self, layer: str) -> Explainer:
        """The explainer for ``layer``."""
        return self._cache.get(layer)

    def layers(self) -> list[str]:
        """The model's named modules."""
        return list(self._cache.layers)


class ClassifierTask(_Base):
    """An image classifier: predictions, and maps for the top-k or the named classes.

    Args:
        name: the model name.
        model: the classifier, output ``(N, C)`` logits.
        labels: the C class labels.
        layer: the default layer to explain at.
        transform: the model's input transform.
        device: where to run (default: the model's).
        predictions: how many predictions every result lists (at least k).
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
    ) -> None:
        self.name = name
        self.model = model
        self.labels = list(labels)
        self.default_layer = layer
        self.transform = transform
        self.n_predictions = predictions
        self._cache = ExplainerCache(model, device)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def prepare(self, item: Item) -> None:
        """Resolves labels and checks class ids; stores the item's targets."""
        _refuse(item, ("question", "answers"), "classifier")
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
        x = _stack(items, self.device)
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
            logits = self.model(_stack(items, self.device)).float()
        probs = F.softmax(logits, dim=-1)
        heads = [
            self._head(probs[i], logits[i], len(it.extra["ids"]) or int(it.extra["k"]))
            for i, it in enumerate(items)
        ]
        return heads, {"forward": time.perf_counter() - t0}


class CaptionTask(_Base):
    """A captioner with ``generate(images) -> (N, L)`` ids and ``forward(images, tokens)``.

    Args:
        name: the model name.
        model: the captioner; ``forward(images, tokens)`` gives logits ``(N, T, V)``.
        generate: greedy decoding, images ``(N, 3, H, W)`` -> word ids ``(N, L)``.
        vocab: its words (id -> word).
        eos_id: the end-of-caption id; ``pad_id``: the padding id.
        layer, transform, device: as for :class:`ClassifierTask`.
    """

    kind: ModelKind = "captioner"

    def __init__(
        self,
        name: str,
        model: nn.Module,
        generate: Callable[[Tensor], Tensor],
        vocab: Sequence[str],
        eos_id: int,
        layer: str,
        transform: InputTransform,
        device: torch.device | str | None = None,
        pad_id: int = 0,
    ) -> None:
        self.name = name
        self.model = model
        self.generate = generate
        self.vocab = list(vocab)
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.default_layer = layer
        self.transform = transform
        self._cache = ExplainerCache(model, device)

    def prepare(self, item: Item) -> None:
        """Captioning takes no targets from the caller."""
        _refuse(item, ("top_k", "class_ids", "labels", "question", "answers"), "captioning")

    def group_key(self, item: Item) -> Hashable:
        """Every captioning item can share a call."""
        return "caption"

    def _captions(self, items: Sequence[Item], x: Tensor) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = self.generate(x).cpu()
        for it, row in zip(items, ids.tolist(), strict=True):
            words = row[: row.index(self.eos_id)] if self.eos_id in row else list(row)
            it.extra["word_ids"] = [w for w in words if w != self.pad_id]
        return time.perf_counter() - t0

    def _head(self, item: Item) -> dict[str, Any]:
        words = tuple(self.vocab[w] for w in item.extra["word_ids"])
        return {"score": "log_probability", "caption": " ".join(words), "words": words}

    def call(self, items: Sequence[Item]) -> EngineCall:
        """Generates the captions, then asks for word and caption log-probabilities."""
        x = _stack(items, self.device)
        generate_s = self._captions(items, x)
        rows = [[*it.extra["word_ids"], self.eos_id] for it in items]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        tokens = tokens.to(self.device)
        real = tokens != self.pad_id

        def score(logits: Tensor, rows: Tensor) -> Tensor:
            """(B, T + 1): log p of each caption token, then the whole caption's sum."""
            tok = tokens[rows]
            lp = F.log_softmax(logits, dim=-1).gather(2, tok.unsqueeze(-1)).squeeze(-1)
            lp = torch.where(real[rows], lp, torch.zeros_like(lp))
            return torch.cat([lp, lp.sum(dim=1, keepdim=True)], dim=1)

        for it in items:
            it.extra["width"] = width
        return EngineCall((x, tokens), score, timings={"generate": generate_s})

    def describe(
        self, exp: Explanation, row: int, item: Item
    ) -> tuple[dict[str, Any], list[Target]]:
        """The caption, one target per word and one for the whole caption."""
        head = self._head(item)
        scores = exp.target_scores[row]
        targets = [
            Target(t, TargetResult(kind="word", label=w, score=float(scores[t]), position=t))
            for t, w in enumerate(head["words"])
        ]
        whole = int(item.extra["width"])
        targets.append(
            Target(
                whole,
                TargetResult(kind="caption", label=head["caption"], score=float(scores[whole])),
            )
        )
        return head, targets

    def predict(self, items: Sequence[Item]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """The generated captions."""
        generate_s = self._captions(items, _stack(items, self.device))
        return [self._head(it) for it in items], {"generate": generate_s}


class VQATask(_Base):
    """A VQA model with ``forward(images, question_tokens) -> (N, A)`` answer logits.

    Args:
        name: the model name.
        model: the VQA model.
        answers: the answer list (id -> answer).
        tokenize: question text -> token ids (raises InvalidRequestError for bad text).
        layer, transform, device: as for :class:`ClassifierTask`.
        pad_id: the padding id of question tokens.
        predictions: how many answers the result lists with their probabilities.
    """

    kind: ModelKind = "vqa"

    def __init__(
        self,
        name: str,
        model: nn.Module,
        answers: Sequence[str],
        tokenize: Callable[[str], list[int]],
        layer: str,
        transform: InputTransform,
        device: torch.device | str | None = None,
        pad_id: int = 0,
        predictions: int = 5,
    ) -> None:
        self.name = name
        self.model = model
        self.answers = list(answers)
        self.tokenize = tokenize
        self.pad_id = pad_id
        self.default_layer = layer
        self.transform = transform
        self.n_predictions = predictions
        self._cache = ExplainerCache(model, device)
        self._index = {a: i for i, a in enumerate(self.answers)}

    def prepare(self, item: Item) -> None:
        """Tokenizes the question and resolves the named answers."""
        _refuse(item, ("top_k", "class_ids", "labels"), "VQA")
        req = item.request
        if req.question is None:
            raise InvalidRequestError("a VQA model needs a question (field 'question')")
        tokens = self.tokenize(req.question)
        if not tokens:
            raise InvalidRequestError(f"the question {req.question!r} has no known words")
        ids = []
        for a in req.answers:
            if a not in self._index:
                raise UnknownNameError("answer", a, self.answers)
            ids.append(self._index[a])
        item.extra["question_ids"] = tokens
        item.extra["answer_ids"] = ids

    def group_key(self, item: Item) -> Hashable:
        """Every VQA item can share a call."""
        return "vqa"

    def _inputs(self, items: Sequence[Item]) -> tuple[Tensor, Tensor]:
        x = _stack(items, self.device)
        width = max(len(it.extra["question_ids"]) for it in items)
        q = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        for i, it in enumerate(items):
            q[i, : len(it.extra["question_ids"])] = torch.tensor(it.extra["question_ids"])
        return x, q.to(self.device)

    def call(self, items: Sequence[Item]) -> EngineCall:
        """Targets: the model's answer (fixed on the unperturbed output), then the named ones."""
        x, q = self._inputs(items)
        k = 1 + max(len(it.extra["answer_ids"]) for it in items)
        named = torch.zeros((len(items), k - 1), dtype=torch.long)
        for i, it in enumerate(items):
            a = it.extra["answer_ids"]
            if a:
                named[i] = torch.tensor(a + [a[-1]] * (k - 1 - len(a)))
        named = named.to(self.device)
        probability = items[0].request.score == "probability"
        fixed: dict[str, Tensor] = {}

        def score(logits: Tensor, rows: Tensor) -> Tensor:
            """(B, K): the model's answer, then the caller's answers (padded)."""
            if "answer" not in fixed:  # the engine's first call is on the real output
                fixed["answer"] = logits.detach().argmax(dim=1)
            ids = torch.cat([fixed["answer"][rows, None], named[rows]], dim=1)
            s = F.softmax(logits, dim=-1) if probability else logits
            return s.gather(1, ids)

        return EngineCall((x, q), score, items[0].request.score)

    def _head(self, logits: Tensor, item: Item) -> tuple[dict[str, Any], int]:
        probs = F.softmax(logits, dim=-1)
        top = torch.topk(probs, min(self.n_predictions, probs.shape[-1]))
        ranked = tuple(
            Prediction(id=int(i), label=self.answers[int(i)], probability=float(p))
            for p, i in zip(top.values, top.indices, strict=True)
        )
        answer = int(logits.argmax())
        head = {
            "question": item.request.question,
            "answer": self.answers[answer],
            "predictions": ranked,
        }
        return head, answer

    def describe(
        self, exp: Explanation, row: int, item: Item
    ) -> tuple[dict[str, Any], list[Target]]:
        """The answer with the top answers' probabilities, and one target per explained answer."""
        head, answer = self._head(exp.output[row].detach().float(), item)
        scores = exp.target_scores[row]
        ids = [answer, *item.extra["answer_ids"]]
        targets = [
            Target(
                j, TargetResult(kind="answer", label=self.answers[a], score=float(scores[j]), id=a)
            )
            for j, a in enumerate(ids)
            if a not in ids[:j]  # a named answer that is the model's own is explained once
        ]
        return head, targets

    def predict(self, items: Sequence[Item]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """The answers and the top answers' probabilities."""
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.model(*self._inputs(items)).float()
        heads = [self._head(logits[i], it)[0] for i, it in enumerate(items)]
        return heads, {"forward": time.perf_counter() - t0}

"""Service tasks of the captioning and VQA models (001 sec. 2.2 and 2.3).

Captioning: the caption is generated greedily, then explained with teacher
forcing: one target per word (its log-probability at its position) plus one for
the whole caption (the sum), all from one forward and one backward (001 Fig. A2).

VQA: one target for the model's answer plus one per answer the caller names,
e.g. "why green and not yellow" (001 Fig. A3).

Score functions take ``rows`` (the engine's index of the source image of each
output row) so that re-running methods (Ablation-CAM, Score-CAM, occlusion, ...)
explain every variant with its own image's targets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine import Explanation
from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.service.images import InputTransform
from camserve.service.outcomes import ModelKind, Prediction, TargetResult
from camserve.service.tasks import (
    EngineCall,
    ExplainerCache,
    Item,
    Target,
    TaskBase,
    refuse,
    stack_inputs,
)

__all__ = ["CaptionTask", "VQATask"]


class CaptionTask(TaskBase):
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
        refuse(item, ("top_k", "class_ids", "labels", "question", "answers"), "captioning")

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
        x = stack_inputs(items, self.device, self.dtype)
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
            # float32 log-probabilities whatever the model's dtype (sums of many words).
            lp = F.log_softmax(logits.float(), dim=-1).gather(2, tok.unsqueeze(-1)).squeeze(-1)
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
        generate_s = self._captions(items, stack_inputs(items, self.device, self.dtype))
        return [self._head(it) for it in items], {"generate": generate_s}


class VQATask(TaskBase):
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
        refuse(item, ("top_k", "class_ids", "labels"), "VQA")
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
        x = stack_inputs(items, self.device, self.dtype)
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

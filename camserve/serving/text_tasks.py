"""Serving tasks for the captioning and VQA models (001 sec. 2.2 and 2.3).

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

from camserve.engine import Explainer, Explanation
from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.serving.batch import EngineCall, Item, Target
from camserve.serving.images import InputTransform
from camserve.serving.tasks import ExplainerCache

__all__ = ["CaptionTask", "VQATask"]


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


class CaptionTask:
    """A captioner with ``generate(images) -> (N, L)`` ids and ``forward(images, tokens)``.

    Args:
        name: the model name.
        model: the captioner; ``forward(images, tokens)`` gives logits (N, T, V).
        generate: greedy decoding, images (N, 3, H, W) -> word ids (N, L).
        vocab: its words (id -> word).
        eos_id: the end-of-caption id; ``pad_id``: the padding id.
        layer, transform, device: as for :class:`~camserve.serving.tasks.ClassifierTask`.
    """

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

    def explainer(self, layer: str) -> Explainer:
        """The explainer for ``layer``."""
        return self._cache.get(layer)

    def prepare(self, item: Item) -> None:
        """Captioning takes no targets from the caller."""
        _refuse(item, ("top_k", "class_ids", "labels", "question", "answers"), "captioning")

    def group_key(self, item: Item) -> Hashable:
        """Every captioning item can share a call."""
        return "caption"

    def call(self, items: Sequence[Item]) -> EngineCall:
        """Generates the captions, then asks for word and caption log-probabilities."""
        x = torch.stack([it.x for it in items]).to(self._cache.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = self.generate(x).cpu()
        generate_s = time.perf_counter() - t0
        rows: list[list[int]] = []
        for it, row in zip(items, ids.tolist(), strict=True):
            words = row[: row.index(self.eos_id)] if self.eos_id in row else list(row)
            words = [w for w in words if w != self.pad_id]
            it.extra["word_ids"] = words
            rows.append([*words, self.eos_id])
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        tokens = tokens.to(self._cache.device)
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
        words = [self.vocab[w] for w in item.extra["word_ids"]]
        caption = " ".join(words)
        scores = exp.target_scores[row]
        targets = [
            Target(t, {"word": w, "position": t, "score": round(float(scores[t]), 6)})
            for t, w in enumerate(words)
        ]
        whole = int(item.extra["width"])
        targets.append(Target(whole, {"caption": caption, "score": round(float(scores[whole]), 6)}))
        return {"score": "log_probability", "caption": caption, "words": words}, targets


class VQATask:
    """A VQA model with ``forward(images, question_tokens) -> (N, A)`` answer logits.

    Args:
        name: the model name.
        model: the VQA model.
        answers: the answer list (id -> answer).
        tokenize: question text -> token ids (raises InvalidRequestError for bad text).
        layer, transform, device: as for :class:`~camserve.serving.tasks.ClassifierTask`.
        pad_id: the padding id of question tokens.
        predictions: how many answers the response lists with their probabilities.
    """

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

    def explainer(self, layer: str) -> Explainer:
        """The explainer for ``layer``."""
        return self._cache.get(layer)

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

    def call(self, items: Sequence[Item]) -> EngineCall:
        """Targets: the model's answer (fixed on the unperturbed output), then the named ones."""
        device = self._cache.device
        x = torch.stack([it.x for it in items]).to(device)
        width = max(len(it.extra["question_ids"]) for it in items)
        q = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        for i, it in enumerate(items):
            q[i, : len(it.extra["question_ids"])] = torch.tensor(it.extra["question_ids"])
        k = 1 + max(len(it.extra["answer_ids"]) for it in items)
        named = torch.zeros((len(items), k - 1), dtype=torch.long)
        for i, it in enumerate(items):
            a = it.extra["answer_ids"]
            if a:
                named[i] = torch.tensor(a + [a[-1]] * (k - 1 - len(a)))
        named = named.to(device)
        probability = items[0].request.score == "probability"
        fixed: dict[str, Tensor] = {}

        def score(logits: Tensor, rows: Tensor) -> Tensor:
            """(B, K): the model's answer, then the caller's answers (padded)."""
            if "answer" not in fixed:  # the engine's first call is on the real output
                fixed["answer"] = logits.detach().argmax(dim=1)
            ids = torch.cat([fixed["answer"][rows, None], named[rows]], dim=1)
            s = F.softmax(logits, dim=-1) if probability else logits
            return s.gather(1, ids)

        return EngineCall((x, q.to(device)), score, items[0].request.score)

    def describe(
        self, exp: Explanation, row: int, item: Item
    ) -> tuple[dict[str, Any], list[Target]]:
        """The answer with the top answers' probabilities, and one target per explained answer."""
        logits = exp.output[row].detach().float()
        probs = F.softmax(logits, dim=-1)
        top = torch.topk(probs, min(self.n_predictions, probs.shape[-1]))
        ranked = [
            {"answer": self.answers[int(i)], "probability": round(float(p), 6)}
            for p, i in zip(top.values, top.indices, strict=True)
        ]
        answer = int(logits.argmax())
        scores = exp.target_scores[row]
        ids = [answer, *item.extra["answer_ids"]]
        targets = [
            Target(j, {"answer": self.answers[a], "score": round(float(scores[j]), 6)})
            for j, a in enumerate(ids)
            if a not in ids[:j]  # a named answer that is the model's own is explained once
        ]
        head = {
            "question": item.request.question,
            "answer": self.answers[answer],
            "answers": ranked,
        }
        return head, targets

"""Training and held-out evaluation of the demo models on synthetic scenes.

Everything is deterministic given the seed: data come from
:func:`camserve.zoo.scenes.generate_scenes`, batches are shuffled by a seeded
``torch.Generator``, and weights start from ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.errors import InvalidRequestError
from camserve.zoo.models import Captioner, VQAModel
from camserve.zoo.scenes import Scene
from camserve.zoo.text import Vocab

__all__ = [
    "MEAN",
    "STD",
    "TrainConfig",
    "caption_batch",
    "evaluate_captioner",
    "evaluate_classifier",
    "evaluate_vqa",
    "images_tensor",
    "normalize",
    "question_batch",
    "train_captioner",
    "train_classifier",
    "train_vqa",
]

#: Input normalisation of every zoo model: ``(pixels / 255 - MEAN) / STD`` per channel.
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW with a one-cycle learning-rate schedule."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def images_tensor(scenes: Sequence[Scene]) -> Tensor:
    """uint8 (N, 3, H, W) tensor of the scenes' images."""
    if not scenes:
        raise InvalidRequestError("no scenes")
    return torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).contiguous()


def normalize(images: Tensor) -> Tensor:
    """float32 model input from uint8 (N, 3, H, W) images (see :data:`MEAN`, :data:`STD`)."""
    x = images.float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def caption_batch(vocab: Vocab, captions: Sequence[str], length: int) -> Tensor:
    """Caption ids (N, length) ending with ``<eos>``, right-padded."""
    return vocab.encode_batch(captions, eos=True, length=length)


def question_batch(vocab: Vocab, questions: Sequence[str], length: int) -> Tensor:
    """Question ids (N, length), right-padded."""
    return vocab.encode_batch(questions, length=length)


LossFn = Callable[[nn.Module, Tensor], Tensor]


def _fit(model: nn.Module, n: int, loss_of: LossFn, cfg: TrainConfig,
         log: Callable[[str], None] | None, name: str) -> list[float]:
    """Mini-batch AdamW + one-cycle over ``n`` examples; ``loss_of(model, batch_idx)``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.25)
    model.train()
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = loss_of(model, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
        if log is not None:
            log(f"[{name}] epoch {epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f}")
    model.eval()
    return losses


def train_classifier(model: nn.Module, images: Tensor, labels: Tensor, cfg: TrainConfig,
                     log: Callable[[str], None] | None = None) -> list[float]:
    """Cross-entropy training of a classifier on uint8 images (N, 3, H, W) and label ids."""
    def loss_of(m: nn.Module, idx: Tensor) -> Tensor:
        return F.cross_entropy(m(normalize(images[idx])), labels[idx])
    return _fit(model, len(labels), loss_of, cfg, log, "classifier")


def train_captioner(model: Captioner, images: Tensor, tokens: Tensor, cfg: TrainConfig,
                    log: Callable[[str], None] | None = None) -> list[float]:
    """Teacher-forced word cross-entropy (padding ignored), 001 sec. 2.2."""
    def loss_of(m: nn.Module, idx: Tensor) -> Tensor:
        tok = tokens[idx]
        logits = m(normalize(images[idx]), tok)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok.reshape(-1),
                               ignore_index=0)
    return _fit(model, len(tokens), loss_of, cfg, log, "captioner")


def train_vqa(model: VQAModel, images: Tensor, image_index: Tensor, questions: Tensor,
              answers: Tensor, cfg: TrainConfig,
              log: Callable[[str], None] | None = None) -> list[float]:
    """Answer cross-entropy over (image, question) pairs; ``image_index`` maps pair -> image.

    Batches are drawn over images, and each image is encoded once for all of
    its questions, so an epoch costs one CNN pass per image.
    """
    n_images = images.shape[0]

    def loss_of(m: nn.Module, idx: Tensor) -> Tensor:
        assert isinstance(m, VQAModel)
        slot = torch.full((n_images,), -1, dtype=torch.long)
        slot[idx] = torch.arange(len(idx))
        pairs = torch.nonzero(slot[image_index] >= 0).squeeze(1)
        img = m.encode_image(normalize(images[idx]))
        logits = m.answer_logits(img[slot[image_index[pairs]]],
                                 m.encode_question(questions[pairs]))
        return F.cross_entropy(logits, answers[pairs])
    return _fit(model, n_images, loss_of, cfg, log, "vqa")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images: Tensor, labels: Tensor,
                        batch_size: int = 256) -> dict[str, float]:
    """Held-out top-1 accuracy."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        pred = model(normalize(images[i:i + batch_size])).argmax(dim=1)
        correct += int((pred == labels[i:i + batch_size]).sum())
    return {"accuracy": correct / len(labels), "n": float(len(labels))}


@torch.no_grad()
def evaluate_captioner(model: Captioner, images: Tensor, captions: Sequence[str],
                       batch_size: int = 256) -> dict[str, float]:
    """Held-out exact-caption rate and per-word accuracy of greedy decoding."""
    model.eval()
    exact, words_ok, words = 0, 0, 0
    for i in range(0, len(captions), batch_size):
        got = model.decode(model.generate(normalize(images[i:i + batch_size])))
        for pred, true in zip(got, captions[i:i + batch_size], strict=True):
            exact += int(pred == true)
            p, t = pred.split(), true.split()
            words_ok += sum(a == b for a, b in zip(p, t, strict=False))
            words += max(len(p), len(t))
    return {"exact": exact / len(captions), "word_accuracy": words_ok / max(words, 1),
            "n": float(len(captions))}


@torch.no_grad()
def evaluate_vqa(model: VQAModel, images: Tensor, image_index: Tensor, questions: Tensor,
                 answers: Tensor, kinds: Sequence[str],
                 batch_size: int = 256) -> dict[str, float]:
    """Held-out answer accuracy, overall and per question kind."""
    model.eval()
    preds = []
    for i in range(0, len(answers), batch_size):
        sl = slice(i, i + batch_size)
        preds.append(model(normalize(images[image_index[sl]]), questions[sl]).argmax(dim=1))
    ok = (torch.cat(preds) == answers).tolist()
    out = {"accuracy": sum(ok) / len(ok), "n": float(len(ok))}
    for kind in sorted(set(kinds)):
        sel = [o for o, k in zip(ok, kinds, strict=True) if k == kind]
        out[f"accuracy_{kind}"] = sum(sel) / len(sel)
    return out

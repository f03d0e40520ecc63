"""Builds a serving task from a model saved by the zoo (the handlers' ``initialize``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from camserve.errors import InvalidRequestError
from camserve.serving.archive import ARCHIVE_INFO
from camserve.serving.batch import Task
from camserve.serving.images import InputTransform
from camserve.serving.tasks import ClassifierTask
from camserve.serving.text_tasks import CaptionTask, VQATask

__all__ = ["load_task"]


def load_task(
    model_dir: str | Path, name: str, device: torch.device, kind: str | None = None
) -> Task:
    """Loads model ``name`` from ``model_dir`` and wraps it in its serving task.

    Everything the task needs (kind, layer, labels or vocabulary, input size and
    normalisation) comes from the zoo's manifest entry.

    Args:
        model_dir: a folder with the zoo's manifest.json and the model's state dict
            (a TorchServe archive's extracted folder, or model_store/). An archive's
            ``camserve.json`` names the zoo model, whatever name it is served under.
        name: the model name (TorchServe's model name).
        device: where to run it.
        kind: ``classifier``, ``captioner`` or ``vqa``; a mismatch raises.
    """
    from camserve import zoo
    from camserve.zoo.models import Captioner
    from camserve.zoo.text import EOS, PAD, Vocab

    model_dir = Path(model_dir)
    zoo_name = name
    info_path = model_dir / ARCHIVE_INFO
    if info_path.exists():
        zoo_name = str(json.loads(info_path.read_text())["zoo_name"])
    model, entry = zoo.load(model_dir, zoo_name, device)
    if kind is not None and entry.kind != kind:
        raise InvalidRequestError(f"model {zoo_name!r} is a {entry.kind}, not a {kind}")
    _, height, width = entry.input_size
    transform = InputTransform(size=(height, width), mean=entry.mean, std=entry.std)
    layer = entry.target_layer
    if entry.kind == "captioner":
        if not isinstance(model, Captioner):
            raise InvalidRequestError(f"model {zoo_name!r} has no caption generator")
        vocab = list(entry.vocab)
        return CaptionTask(
            name,
            model,
            model.generate,
            vocab,
            vocab.index(EOS),
            layer,
            transform,
            device,
            pad_id=vocab.index(PAD),
        )
    if entry.kind == "vqa":
        words = Vocab(list(entry.vocab))
        return VQATask(
            name,
            model,
            list(entry.labels),
            words.encode,
            layer,
            transform,
            device,
            pad_id=words.words.index(PAD),
        )
    return ClassifierTask(name, model, list(entry.labels), layer, transform, device)

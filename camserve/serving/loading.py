"""Builds a serving task from a model saved by the zoo (the handlers' ``initialize``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from camserve.errors import InvalidRequestError
from camserve.serving.archive import ARCHIVE_INFO
from camserve.serving.batch import Task
from camserve.serving.images import InputTransform
from camserve.serving.tasks import ClassifierTask
from camserve.serving.text_tasks import CaptionTask, VQATask

__all__ = ["kind_of", "load_task"]


def kind_of(model: torch.nn.Module) -> str:
    """``classifier``, ``captioner`` or ``vqa`` for a zoo model."""
    from camserve.zoo.models import Captioner, VQAModel

    if isinstance(model, Captioner):
        return "captioner"
    if isinstance(model, VQAModel):
        return "vqa"
    return "classifier"


def _image_size(entry: Any, model: torch.nn.Module) -> int:
    for source in (entry if isinstance(entry, dict) else {}, getattr(model, "__dict__", {})):
        for key in ("image_size", "input_size", "size"):
            value = source.get(key)
            if isinstance(value, int):
                return value
            if isinstance(value, list | tuple) and value and isinstance(value[-1], int):
                return int(value[-1])
    return 64


def load_task(
    model_dir: str | Path, name: str, device: torch.device, kind: str | None = None
) -> Task:
    """Loads model ``name`` from ``model_dir`` and wraps it in its serving task.

    Args:
        model_dir: a folder with the zoo's manifest.json and the model's state dict
            (a TorchServe archive's extracted folder, or model_store/). An archive's
            ``camserve.json`` names the zoo model, whatever name it is served under.
        name: the model name (TorchServe's model name).
        device: where to run it.
        kind: ``classifier``, ``captioner`` or ``vqa``; a mismatch raises.
    """
    from camserve import zoo
    from camserve.zoo.models import Captioner, VQAModel
    from camserve.zoo.text import Vocab
    from camserve.zoo.train import MEAN, STD

    model_dir = Path(model_dir)
    zoo_name = name
    info_path = model_dir / ARCHIVE_INFO
    if info_path.exists():
        zoo_name = str(json.loads(info_path.read_text())["zoo_name"])
    model, entry = zoo.load(model_dir, zoo_name)
    model = model.to(device).eval()
    found = kind_of(model)
    if kind is not None and found != kind:
        raise InvalidRequestError(f"model {zoo_name!r} is a {found}, not a {kind}")
    size = _image_size(entry, model)
    transform = InputTransform(size=(size, size), mean=MEAN, std=STD)
    layer = str(model.target_layer)
    if isinstance(model, Captioner):
        return CaptionTask(
            name, model, model.generate, list(model.vocab), model.eos_id, layer, transform, device
        )
    if isinstance(model, VQAModel):
        words = Vocab(list(model.vocab))
        return VQATask(name, model, list(model.answers), words.encode, layer, transform, device)
    labels = [str(label) for label in getattr(model, "labels")]  # noqa: B009
    return ClassifierTask(name, model, labels, layer, transform, device)

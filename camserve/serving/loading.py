"""Builds a serving task from a model saved by the zoo (the handlers' initialize)."""

from __future__ import annotations

from pathlib import Path

import torch

from camserve.errors import InvalidRequestError
from camserve.serving.batch import Task

__all__ = ["load_task"]


def load_task(
    model_dir: str | Path, name: str, device: torch.device, kind: str | None = None
) -> Task:
    """Loads model ``name`` from ``model_dir`` and wraps it in its serving task.

    Args:
        model_dir: a folder with the zoo's manifest.json and the model's state dict
            (a TorchServe archive's extracted folder, or model_store/).
        name: the model name in the manifest.
        device: where to run it.
        kind: ``classifier``, ``captioner`` or ``vqa``; a mismatch raises.
    """
    raise InvalidRequestError(f"cannot load {name!r} from {model_dir} ({kind}, {device})")

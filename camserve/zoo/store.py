"""The model store's manifest and the loader used by the serving adapters.

``model_store/manifest.json`` lists every built model with what a server needs
to run and explain it: architecture id and constructor arguments, the state
dict file (weights only, never a pickled model), the layer to explain, the
labels / vocabulary / answer list, input size and normalisation, and the
held-out figures of the build.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.models import ModelSpec, write_spec
from camserve.zoo.models import ARCHITECTURES, build_model

__all__ = [
    "MANIFEST",
    "ModelEntry",
    "ModelKind",
    "load",
    "model_spec",
    "read_manifest",
    "write_manifest",
    "write_specs",
]

MANIFEST = "manifest.json"
ModelKind = Literal["classifier", "captioner", "vqa"]


@dataclass(frozen=True)
class ModelEntry:
    """One model of the store (a ``models`` item of ``manifest.json``).

    Attributes:
        name: the model's name in the store (and in the servers).
        kind: ``classifier`` (output (N, C)), ``captioner`` (inputs images and
            caption tokens, output (N, T, V)) or ``vqa`` (inputs images and
            question tokens, output (N, A)).
        arch: architecture id in :data:`camserve.zoo.models.ARCHITECTURES`.
        kwargs: constructor arguments.
        state_dict: file name of the weights, relative to the store.
        target_layer: module path of the layer the engine explains by default.
        labels: class names (classifiers) or answers (VQA); empty for a captioner.
        vocab: word list of the caption or question tokens; empty for classifiers.
        input_size: ``[3, H, W]``.
        mean, std: per-channel normalisation, ``(pixels / 255 - mean) / std``.
        metrics: held-out figures of the build.
        seed: the seed its weights were initialised and its data drawn from.
    """

    name: str
    kind: ModelKind
    arch: str
    kwargs: dict[str, Any]
    state_dict: str
    target_layer: str
    labels: tuple[str, ...]
    vocab: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    metrics: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key in ("labels", "vocab", "input_size", "mean", "std"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelEntry:
        """Inverse of :meth:`to_json`."""
        kind = str(data["kind"])
        if kind not in ("classifier", "captioner", "vqa"):
            raise UnknownNameError("model kind", kind, ("classifier", "captioner", "vqa"))
        size = [int(v) for v in data["input_size"]]
        mean = [float(v) for v in data["mean"]]
        std = [float(v) for v in data["std"]]
        return cls(
            name=str(data["name"]), kind=kind,  # type: ignore[arg-type]  # checked above
            arch=str(data["arch"]), kwargs=dict(data["kwargs"]),
            state_dict=str(data["state_dict"]), target_layer=str(data["target_layer"]),
            labels=tuple(str(v) for v in data["labels"]),
            vocab=tuple(str(v) for v in data["vocab"]),
            input_size=(size[0], size[1], size[2]),
            mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2]),
            metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
            seed=int(data.get("seed", 0)),
        )


def write_manifest(store: str | Path, entries: list[ModelEntry], extra: dict[str, Any]) -> Path:
    """Writes ``manifest.json``: ``extra`` keys (build info) plus ``models``."""
    path = Path(store) / MANIFEST
    payload = {**extra, "models": [e.to_json() for e in entries]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def read_manifest(store: str | Path) -> tuple[dict[str, Any], dict[str, ModelEntry]]:
    """The manifest's build info and its entries by name."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise InvalidRequestError(f"no {MANIFEST} in {store}: build the models first "
                                  "(python -m camserve.zoo.build --out <dir>)")
    data = json.loads(path.read_text())
    entries = {str(m["name"]): ModelEntry.from_json(m) for m in data.get("models", [])}
    info = {k: v for k, v in data.items() if k != "models"}
    return info, entries


def load(store: str | Path, name: str,
         device: str | torch.device | None = None) -> tuple[nn.Module, ModelEntry]:
    """Builds model ``name`` from the store's manifest and weights, in eval mode.

    Args:
        store: the model store directory (holding ``manifest.json``).
        name: a model name listed in the manifest.
        device: where to put the model (default: CPU, where the weights load).

    Returns:
        ``(model, entry)``; unknown names raise :class:`UnknownNameError`.
    """
    _, entries = read_manifest(store)
    if name not in entries:
        raise UnknownNameError("model", name, entries)
    entry = entries[name]
    model = build_model(entry.arch, entry.kwargs)
    state = torch.load(Path(store) / entry.state_dict, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if device is not None:
        model = model.to(device)
    return model.eval(), entry


def model_spec(store: str | Path, entry: ModelEntry) -> ModelSpec:
    """The :class:`ModelSpec` of a manifest entry (factory: the architecture's class)."""
    cls = ARCHITECTURES[entry.arch]
    return ModelSpec(
        name=entry.name,
        kind=entry.kind,
        layer=entry.target_layer,
        input_size=entry.input_size,
        mean=entry.mean,
        std=entry.std,
        labels=entry.labels,
        vocab=entry.vocab,
        factory=f"{cls.__module__}:{cls.__name__}",
        factory_kwargs=dict(entry.kwargs),
        weights=Path(store).resolve() / entry.state_dict,
        extra={"metrics": dict(entry.metrics), "seed": entry.seed, "source": "camserve.zoo"},
    )


def write_specs(store: str | Path) -> list[Path]:
    """Writes ``<store>/<name>.toml``, the model spec of every model in the manifest."""
    _, entries = read_manifest(store)
    folder = Path(store)
    return [write_spec(model_spec(store, e), folder / f"{e.name}.toml") for e in entries.values()]

"""``ModelSpec``: everything camserve needs to load, run and explain one model.

A spec comes from the zoo's build, from a user's spec file (TOML or YAML), or
from code. Loaders (see :mod:`camserve.models`) turn it into a runnable model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from camserve.engine.layout import TokenGrid

__all__ = ["LAYOUT_NAMES", "ModelKind", "ModelSpec", "Runtime", "SpecLayout", "layout_text"]

ModelKind = Literal["classifier", "captioner", "vqa"]
Runtime = Literal["torch", "onnx"]
SpecLayout: TypeAlias = Literal["auto", "channels_first", "channels_last"] | TokenGrid
"""How the explained layers' outputs are read (see :mod:`camserve.engine.layout`)."""
LAYOUT_NAMES = ("auto", "channels_first", "channels_last")
"""The named layouts a spec may give (besides a token grid table)."""


def layout_text(layout: str | TokenGrid) -> str:
    """A layout in words: ``auto``, ``channels_last``, ``tokens: 1 prefix token(s), grid 4 x 4``."""
    if isinstance(layout, str):
        return layout
    prefix = "detected" if layout.prefix is None else str(layout.prefix)
    grid = (
        "of the input's aspect ratio"
        if layout.grid is None
        else f"{layout.grid[0]} x {layout.grid[1]}"
    )
    return f"tokens: {prefix} prefix token(s), grid {grid}"


@dataclass(frozen=True)
class ModelSpec:
    """One servable model.

    Exactly one source: ``factory`` (``"package.module:function"`` called with
    ``factory_kwargs``, then ``weights`` loaded with ``weights_only=True``), or
    ``program`` (a TorchScript or ``torch.export`` file).

    Attributes:
        name: the model's name in the servers.
        kind: ``classifier`` (output (N, C) logits), ``captioner`` (inputs images
            and caption tokens, output (N, T, V), with a ``generate(images)``
            method) or ``vqa`` (inputs images and question tokens, output (N, A)).
        layer: module path of the default layer to explain (``named_modules()``).
        input_size: ``(3, H, W)`` of the model input.
        mean, std: per-channel normalisation, ``(pixels / 255 - mean) / std``.
        labels: class names (classifier) or answers (VQA).
        vocab: caption / question words (captioner, VQA).
        factory, factory_kwargs: the constructor of the architecture.
        weights: a state dict file (loaded with ``weights_only=True``).
        program: a TorchScript / ``torch.export`` file, instead of a factory.
        onnx: an exported ONNX file (see :mod:`camserve.export`).
        runtime: ``torch`` or ``onnx``. A classifier with runtime ``onnx`` may
            give the ``onnx`` file alone (no factory, no program): the graph then
            predicts and explains by itself (see :mod:`camserve.export.serving`).
        layout: how the outputs of the explained layers are read as
            activations ``(N, C, h, w)``: ``auto`` (default: ``(N, C, h, w)``,
            ``(N, h, w, C)`` or tokens ``(N, T, C)`` told apart by the input's
            aspect ratio), ``channels_first``, ``channels_last`` (Swin's
            ``(N, h, w, C)``), or a :class:`~camserve.engine.layout.TokenGrid`
            (ViT/DeiT tokens ``(N, prefix + h * w, C)``); see
            :mod:`camserve.engine.layout`.
        origin: the spec file it was read from (relative paths are relative to
            its folder), or None.
        extra: further facts (the zoo's held-out metrics, the build seed...).
    """

    name: str
    kind: ModelKind
    layer: str
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    labels: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ()
    factory: str | None = None
    factory_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    program: Path | None = None
    onnx: Path | None = None
    runtime: Runtime = "torch"
    layout: SpecLayout = "auto"
    origin: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

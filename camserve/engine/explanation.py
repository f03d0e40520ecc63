"""The result of one :meth:`~camserve.engine.Explainer.explain` call."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from camserve.engine.maps import normalize, upsample
from camserve.errors import UnknownNameError

__all__ = ["INPUT_LAYER", "Explanation"]

INPUT_LAYER = "input"
"""Layer key of the maps at the input resolution (guided backprop, occlusion, ...)."""


@dataclass(frozen=True)
class Explanation:
    """Predictions and maps from one call.

    Attributes:
        output: the model output (detached).
        logits: ``(N, C)``, or None when the output is not an ``(N, C)`` tensor.
        probabilities: ``softmax(logits)`` ``(N, C)``, or None.
        target_ids: LongTensor ``(N, K)``: the explained class ids per image
            (``arange(K)`` for a score function).
        target_scores: ``(N, K)``: the explained scores.
        maps: layer name -> method id -> float32 raw maps ``(N, K, h, w)`` at
            the layer's resolution (after the final ReLU where the method has
            one); input-resolution methods under ``"input"`` as ``(N, K, H, W)``.
        stats: per method (``"gradcampp"``; ``"gradcampp@<layer>"`` for every
            layer) diagnostic numbers, e.g. Grad-CAM++'s alpha statistics (002).
        timings: seconds per stage: ``"forward"``, ``"backward"``,
            ``"method.<id>"``, ``"upsample"``, ``"total"``.
        layers: the explained layers, in the order given.
        methods: the requested method ids, in the order given.
        input_size: ``(H, W)`` of the input images.
    """

    output: Any
    logits: Tensor | None
    probabilities: Tensor | None
    target_ids: Tensor
    target_scores: Tensor
    maps: dict[str, dict[str, Tensor]]
    stats: dict[str, dict[str, float]]
    timings: dict[str, float]
    layers: tuple[str, ...]
    methods: tuple[str, ...]
    input_size: tuple[int, int]
    _cache: dict[tuple[str, str, tuple[int, int]], Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    def _layer(self, method: str, layer: str | None) -> str:
        if layer is None:
            if self.layers and method in self.maps.get(self.layers[0], {}):
                return self.layers[0]
            return INPUT_LAYER
        if layer not in self.maps:
            raise UnknownNameError("layer", layer, self.maps)
        return layer

    def map(self, method: str, layer: str | None = None) -> Tensor:
        """Raw maps of ``method`` at ``layer`` (None: the first layer, or ``"input"``)."""
        key = self._layer(method, layer)
        maps = self.maps.get(key, {})
        if method not in maps:
            raise UnknownNameError("method", method, maps)
        return maps[method]

    def normalized(self, method: str, layer: str | None = None) -> Tensor:
        """Per-map min-max normalised maps in ``[0, 1]`` (a constant map gives zeros)."""
        return normalize(self.map(method, layer))

    def upsampled(
        self, method: str, layer: str | None = None, size: Sequence[int] | None = None
    ) -> Tensor:
        """Normalised maps bilinearly upsampled to ``size`` (default: the input size).

        Results are cached; the time spent is added to ``timings["upsample"]``.
        """
        key = self._layer(method, layer)
        hw = (int(size[0]), int(size[1])) if size is not None else self.input_size
        cached = self._cache.get((key, method, hw))
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        out = upsample(self.normalized(method, key), hw)
        self.timings["upsample"] = self.timings.get("upsample", 0.0) + time.perf_counter() - t0
        self._cache[(key, method, hw)] = out
        return out

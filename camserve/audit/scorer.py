"""What an audit needs of the model it audits: the :class:`Scorer` protocol and its in-process form.

The runner sees the model only through a scorer: class probabilities of a
batch of images, and explanation maps for given classes. Images travel as
float pixels in ``[0, 1]``, ``(N, 3, H, W)`` at the model's input size, so a
remote scorer (a gateway client sending images and ``predict_only``
requests) fits the same protocol as the in-process one below.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from camserve.engine import INPUT_LAYER, Explainer
from camserve.engine.methods import INPUT_METHODS
from camserve.errors import InvalidRequestError, UnsupportedMethodError

__all__ = ["Explained", "InProcessScorer", "Scorer", "load_zoo_scorer"]

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Explained:
    """Maps of one batch.

    Attributes:
        maps: method id -> ``(N, K, H, W)`` float32 maps, min-max normalised to
            ``[0, 1]`` and upsampled to the input size.
        sums: method id -> ``(N, K)`` sum of the raw map over the layer's
            positions (before normalising; for conservation), when known.
        peaks: method id -> ``(N, K)`` maximum of the raw map.
        scores: ``(N, K)`` the explained (pre-softmax) scores.
        stats: per image, ``stats["gradcampp"]`` of the top target (alpha
            statistics, 002), when asked for; else empty.
    """

    maps: dict[str, F32]
    sums: dict[str, F32]
    peaks: dict[str, F32]
    scores: F32
    stats: list[dict[str, float]] = field(default_factory=list)


class Scorer(Protocol):
    """The audited model, local or remote.

    Attributes:
        labels: class names, by class id.
        input_size: ``(H, W)`` the images must have.
        digest: identifies the model's weights (recorded with the results).
        layer: the explained layer, as a name.
    """

    labels: tuple[str, ...]
    input_size: tuple[int, int]
    digest: str
    layer: str

    def predict(self, pixels: F32) -> F32:
        """Class probabilities ``(B, C)`` of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        ...

    def explain(
        self,
        pixels: F32,
        methods: Sequence[str],
        class_ids: NDArray[np.int64],
        options: Mapping[str, Mapping[str, Any]],
        alpha_stats: bool = False,
    ) -> Explained:
        """Maps of ``class_ids`` ``(N, K)`` for every method."""
        ...


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file (a state dict, an exported program)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


class InProcessScorer:
    """A PyTorch model on this machine, explained with :class:`~camserve.engine.Explainer`.

    Every gradient method of a batch comes from one forward and one backward
    (the engine's single pass); probabilities of perturbed images come from
    plain forwards under :func:`torch.inference_mode`, ``batch_size`` at a time.

    Args:
        model: the classifier in eval mode, output ``(N, C)`` logits.
        layer: module path of the layer to explain.
        labels: class names.
        input_size: ``(H, W)``.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels.
        digest: identifies the weights.
        batch_size: images per forward when scoring perturbed images.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        labels: Sequence[str],
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        digest: str,
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.layer = layer
        self.labels = tuple(labels)
        self.input_size = input_size
        self.digest = digest
        self.batch_size = batch_size
        self._mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
        self.explainer = Explainer(model, layer)

    def _input(self, pixels: F32) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        return (x - self._mean) / self._std

    def predict(self, pixels: F32) -> F32:
        """Class probabilities ``(B, C)`` of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        out = []
        with torch.inference_mode():
            for i in range(0, pixels.shape[0], self.batch_size):
                logits = self.model(self._input(pixels[i : i + self.batch_size]))
                out.append(torch.softmax(logits.float(), dim=1).numpy())
        return np.concatenate(out).astype(np.float32)

    def explain(
        self,
        pixels: F32,
        methods: Sequence[str],
        class_ids: NDArray[np.int64],
        options: Mapping[str, Mapping[str, Any]],
        alpha_stats: bool = False,
    ) -> Explained:
        """Maps of ``class_ids`` ``(N, K)`` for every method (one engine call)."""
        x = self._input(pixels)
        ids = torch.from_numpy(np.asarray(class_ids, dtype=np.int64))
        res = self.explainer.explain(x, methods=list(methods), targets=ids, options=options)
        maps: dict[str, F32] = {}
        sums: dict[str, F32] = {}
        peaks: dict[str, F32] = {}
        for m in methods:
            layer = INPUT_LAYER if m in INPUT_METHODS else self.layer
            maps[m] = res.upsampled(m, layer).numpy().astype(np.float32)
            raw = res.map(m, layer)
            sums[m] = raw.sum(dim=(-2, -1)).numpy().astype(np.float32)
            peaks[m] = raw.amax(dim=(-2, -1)).numpy().astype(np.float32)
        stats: list[dict[str, float]] = []
        if alpha_stats:
            if "gradcampp" not in methods:
                raise UnsupportedMethodError("alpha statistics need the method gradcampp")
            opts = {"gradcampp": {**options.get("gradcampp", {}), "stats": True}}
            for i in range(x.shape[0]):
                one = self.explainer.explain(
                    x[i : i + 1], methods=["gradcampp"], targets=ids[i : i + 1, :1], options=opts
                )
                stats.append(dict(one.stats.get("gradcampp", {})))
        return Explained(maps, sums, peaks, res.target_scores.numpy().astype(np.float32), stats)


def load_zoo_scorer(store: str | Path, name: str, layer: str | None = None) -> InProcessScorer:
    """An in-process scorer of a model of the demo zoo's store (``model_store/``).

    Raises:
        UnknownNameError: a model the store does not list.
        InvalidRequestError: a model that is not a classifier.
    """
    from camserve.zoo.store import load

    model, entry = load(store, name)
    if entry.kind != "classifier":
        raise InvalidRequestError(f"model {name!r} is a {entry.kind}; audits need a classifier")
    for p in model.parameters():
        p.requires_grad_(False)
    return InProcessScorer(
        model,
        layer or entry.target_layer,
        entry.labels,
        (entry.input_size[1], entry.input_size[2]),
        entry.mean,
        entry.std,
        file_digest(Path(store) / entry.state_dict),
    )

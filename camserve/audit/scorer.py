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

from camserve.engine import Explainer
from camserve.engine.graph import find_cam_head
from camserve.engine.methods import gradient, perturbation
from camserve.errors import InvalidRequestError, UnknownNameError, UnsupportedMethodError

__all__ = ["SENSITIVITY_METHODS", "Explained", "InProcessScorer", "Scorer", "file_digest",
           "load_scorer", "load_zoo_scorer"]

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
        contributions: method id -> ``(N, C)`` each channel's share
            ``w_k sum_xy A^k`` of the top target's raw map, before its final
            ReLU (004 eq. 5), for the methods in :data:`SENSITIVITY_METHODS`,
            when asked for; else empty.
        drops: ``(N, C)`` the top target's score drop ``S - S_k`` with channel
            ``k`` of the layer zeroed, when asked for; else None.
    """

    maps: dict[str, F32]
    sums: dict[str, F32]
    peaks: dict[str, F32]
    scores: F32
    stats: list[dict[str, float]] = field(default_factory=list)
    contributions: dict[str, F32] = field(default_factory=dict)
    drops: F32 | None = None


SENSITIVITY_METHODS: tuple[str, ...] = (*gradient.CHANNEL_WEIGHTS, "cam", "ablationcam")
"""Methods whose map is ``ReLU(sum_k w_k A^k)`` (or ``sum_k w_k A^k``) with one weight per
channel, so the sensitivity residual (004 eq. 5) applies: the gradient methods of
:data:`camserve.engine.methods.gradient.CHANNEL_WEIGHTS`, CAM (the head's weights) and
Ablation-CAM (drops over ``S`` or over ``sum_xy A^k``, as its ``form`` option says)."""


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
        sensitivity: bool = False,
    ) -> Explained:
        """Maps of ``class_ids`` ``(N, K)`` for every method (with ``sensitivity``, also
        the channel contributions and drops of the top target, where the scorer can)."""
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
        sensitivity: bool = False,
    ) -> Explained:
        """Maps of ``class_ids`` ``(N, K)`` for every method (one engine call).

        With ``sensitivity``, also :attr:`Explained.contributions` and
        :attr:`Explained.drops` of the first target of every image (see
        :meth:`channel_terms`).
        """
        x = self._input(pixels)
        ids = torch.from_numpy(np.asarray(class_ids, dtype=np.int64))
        res = self.explainer.explain(x, methods=list(methods), targets=ids, options=options)
        maps: dict[str, F32] = {}
        sums: dict[str, F32] = {}
        peaks: dict[str, F32] = {}
        for m in methods:
            # None: the explained layer, or "input" for input-resolution methods (occlusion)
            maps[m] = res.upsampled(m).numpy().astype(np.float32)
            raw = res.map(m)
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
        contributions: dict[str, F32] = {}
        drops: F32 | None = None
        wanted = [m for m in methods if m in SENSITIVITY_METHODS]
        if sensitivity and wanted:
            contributions, drops = self.channel_terms(x, ids[:, 0], wanted, options)
        return Explained(maps, sums, peaks, res.target_scores.numpy().astype(np.float32), stats,
                         contributions, drops)

    def channel_terms(
        self,
        x: torch.Tensor,
        class_ids: torch.Tensor,
        methods: Sequence[str],
        options: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, F32], F32]:
        """Per channel, each method's share of the map and the score's drop (004 eq. 5).

        One forward and backward give the layer's activations ``A`` and the
        gradients of the pre-softmax scores ``S``; the channel weights come
        from the engine's own weight functions
        (:data:`~camserve.engine.methods.gradient.CHANNEL_WEIGHTS`, CAM's head
        rows), the drops ``S - S_k`` from the engine's Ablation-CAM numerator
        (:func:`~camserve.engine.methods.perturbation.ablation_drops`), re-running
        the model with channel ``k`` of the layer zeroed, ``C`` runs per image.

        Args:
            x: ``(N, 3, H, W)`` normalised model inputs.
            class_ids: ``(N,)`` the explained class of each image.
            methods: ids among :data:`SENSITIVITY_METHODS`.
            options: engine options per method (Ablation-CAM's ``form``).

        Returns:
            method id -> ``(N, C)`` contributions ``w_k sum_xy A^k``, and the
            ``(N, C)`` drops.

        Raises:
            UnsupportedMethodError: the layer's output is not ``(N, C, h, w)``,
                or ``cam`` on a model without a GAP + linear head after the layer.
        """
        module = self.model.get_submodule(self.layer)
        held: dict[str, torch.Tensor] = {}
        swap: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
            if "acts" in swap:
                return swap["acts"]
            held["acts"] = out
            return None

        handle = module.register_forward_hook(hook)
        try:
            rows = torch.arange(x.shape[0])
            with torch.enable_grad():
                logits = self.model(x.clone().requires_grad_())
                acts = held.get("acts")
                if not isinstance(acts, torch.Tensor) or acts.dim() != 4:
                    raise UnsupportedMethodError(
                        f"the sensitivity residual needs (N, C, h, w) activations at layer "
                        f"{self.layer!r}"
                    )
                scores = logits[rows, class_ids]
                (grads,) = torch.autograd.grad(scores.sum(), acts)
            a, s = acts.detach().double(), scores.detach().double()
            g = grads.detach().double()[:, None]  # (N, 1, C, h, w)

            def tail(i: int, batch: torch.Tensor) -> torch.Tensor:
                swap["acts"] = batch.to(acts.dtype)
                try:
                    with torch.no_grad():
                        copies = x[i : i + 1].expand(batch.shape[0], *x.shape[1:])
                        out: torch.Tensor = self.model(copies)
                finally:
                    del swap["acts"]
                return out[:, class_ids[i] : class_ids[i] + 1]

            drops = perturbation.ablation_drops(a, s[:, None], tail, batch_size=self.batch_size)
        finally:
            handle.remove()
        d = drops[:, :, 0]  # (N, C)
        totals = a.sum(dim=(-2, -1))  # (N, C)
        out: dict[str, F32] = {}
        for m in methods:
            if m == "cam":
                head = find_cam_head(self.model, a, logits.detach())
                if head is None:
                    raise UnsupportedMethodError(
                        f"cam needs a global-average-pooling + linear head after {self.layer!r}"
                    )
                w = head.detach().double()[class_ids]  # (N, C)
            elif m == "ablationcam":
                form = options.get("ablationcam", {}).get("form", "score")
                den = s[:, None].expand_as(d) if form == "score" else totals
                w = torch.where(den.abs() < 1e-7, torch.zeros_like(d), d / den)
            else:
                w = gradient.CHANNEL_WEIGHTS[m][0](a, g)[:, 0]
            out[m] = (w * totals).numpy().astype(np.float32)
        return out, d.numpy().astype(np.float32)


def _state_digest(model: nn.Module) -> str:
    """``sha256:<hex>`` of a model's state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def load_scorer(model: str | Path, store: str | Path = "model_store",
                layer: str | None = None) -> InProcessScorer:
    """An in-process scorer of a model spec: a zoo model, ``efficientnet_lite0`` or a spec file.

    The name is resolved with :func:`camserve.models.resolve` (a spec file, a
    ``<store>/<name>.toml`` spec, or a built-in model); a zoo store without
    spec files is read from its manifest.

    Raises:
        UnknownNameError: a model none of these knows.
        InvalidRequestError: a model that is not a classifier; a bad spec.
    """
    from camserve.models import load_model, resolve

    try:
        spec = resolve(model, store)
    except UnknownNameError:
        from camserve.zoo.store import model_spec, read_manifest

        try:
            _, entries = read_manifest(store)
        except InvalidRequestError:
            entries = {}
        if str(model) not in entries:
            raise
        spec = model_spec(store, entries[str(model)])
    if spec.kind != "classifier":
        raise InvalidRequestError(f"model {spec.name!r} is a {spec.kind}; audits need a classifier")
    loaded = load_model(spec)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    source = spec.weights or spec.program
    digest = file_digest(source) if source is not None else _state_digest(loaded.model)
    return InProcessScorer(
        loaded.model,
        layer or spec.layer,
        spec.labels,
        (spec.input_size[1], spec.input_size[2]),
        spec.mean,
        spec.std,
        digest,
    )


def load_zoo_scorer(store: str | Path, name: str, layer: str | None = None) -> InProcessScorer:
    """An in-process scorer of a model of the demo zoo's store (see :func:`load_scorer`)."""
    return load_scorer(name, store, layer)

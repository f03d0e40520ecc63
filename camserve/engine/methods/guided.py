"""Guided Backpropagation and Guided-X maps at the input resolution (001 sec. 2, 004)."""

from __future__ import annotations

from torch import Tensor

from camserve.engine._numerics import finite
from camserve.engine.maps import normalize, upsample
from camserve.engine.methods._base import work

__all__ = ["REDUCTIONS", "guided_backprop", "guided_product"]

REDUCTIONS = ("absmax", "sum", "norm")


def guided_backprop(input_grads: Tensor, *, reduce: str = "absmax") -> Tensor:
    """Reduce guided-backprop input gradients ``(N, K, C, H, W)`` to maps ``(N, K, H, W)``.

    Guided Backpropagation (Springenberg et al.) passes only positive
    gradients through each ReLU, at positive activations. The colour channels
    are reduced with ``reduce``: ``"absmax"`` (largest magnitude, as saliency
    maps do; the default), ``"sum"`` (signed), or ``"norm"`` (L2).
    """
    g = finite(work(input_grads))
    if reduce == "sum":
        out = g.sum(dim=2)
    elif reduce == "norm":
        out = g.pow(2).sum(dim=2).sqrt()
    else:
        out = g.abs().amax(dim=2)
    return finite(out.float())


def guided_product(guided: Tensor, layer_maps: Tensor) -> Tensor:
    """Guided X: guided backprop ``(N, K, H, W)`` times the normalised, upsampled map X.

    Guided Grad-CAM (001 sec. 2) and Guided XGrad-CAM (004) are this product
    with X = Grad-CAM and X = XGrad-CAM.
    """
    up = upsample(normalize(layer_maps), guided.shape[-2:])
    return finite(guided.float() * up)

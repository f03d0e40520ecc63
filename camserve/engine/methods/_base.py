"""Shared pieces of the map methods: weighting feature maps, the final ReLU."""

from __future__ import annotations

import torch
from torch import Tensor

from camserve.engine._numerics import finite

__all__ = ["combine", "combine_elementwise", "work"]


def work(t: Tensor) -> Tensor:
    """``t`` in the working precision: float64 stays float64, anything else becomes float32."""
    return t if t.dtype == torch.float64 else t.float()


def combine(acts: Tensor, weights: Tensor, *, relu: bool = True) -> Tensor:
    """``L^c = ReLU(sum_k w_k^c A^k)`` for every image and target.

    Args:
        acts: ``(N, C, h, w)`` activations ``A``.
        weights: ``(N, K, C)`` channel weights ``w``.
        relu: apply the final ReLU (Grad-CAM eq. 2; 001 Table A2 drops it).

    Returns:
        float32 ``(N, K, h, w)``.
    """
    a = finite(work(acts))
    w = finite(work(weights)).to(a.dtype)
    n, c, h, wd = a.shape
    maps = torch.bmm(w, a.reshape(n, c, h * wd)).reshape(n, w.shape[1], h, wd)
    return finite((maps.clamp(min=0) if relu else maps).float())


def combine_elementwise(acts: Tensor, weights: Tensor, *, relu: bool = True) -> Tensor:
    """``L^c = ReLU(sum_k W_k^c ∘ A^k)`` with per-position weights ``(N, K, C, h, w)``."""
    a = finite(work(acts))
    maps = (finite(work(weights)).to(a.dtype) * a[:, None]).sum(dim=2)
    return finite((maps.clamp(min=0) if relu else maps).float())

"""Activation-weighted methods that need no gradient: CAM."""

from __future__ import annotations

from torch import Tensor

from camserve.engine.methods._base import combine

__all__ = ["cam"]


def cam(acts: Tensor, class_weights: Tensor) -> Tensor:
    """CAM: ``L^c = ReLU(sum_k w_k^c A^k)`` with ``w`` the head's weights (000 sec. 3).

    Only defined when the score is a linear function of the globally
    average-pooled activations (GAP + linear head); the engine checks that.

    Args:
        acts: ``(N, C, h, w)``.
        class_weights: ``(N, K, C)``: for each image and target class, the
            linear head's weight row of that class.
    """
    return combine(acts, class_weights)

"""Argument checks shared by the re-running methods (perturbation and reference)."""

from __future__ import annotations

import torch
from torch import Tensor

from camserve.errors import InvalidRequestError

__all__ = ["check_4d", "positive_int", "work_dtype"]


def positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool), else InvalidRequestError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_4d(name: str, t: object) -> None:
    """``t`` must be a non-empty floating-point ``(N, C, H, W)`` tensor."""
    if not isinstance(t, Tensor):
        raise InvalidRequestError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[0] == 0:
        raise InvalidRequestError(
            f"{name} must have shape (N, C, H, W) with N >= 1, got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise InvalidRequestError(f"{name} must be a floating-point tensor, got {t.dtype}")


def work_dtype(t: Tensor) -> torch.dtype:
    """The working precision for ``t``: float64 stays, anything narrower becomes float32."""
    return torch.promote_types(t.dtype, torch.float32)

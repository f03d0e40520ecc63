"""Numerical guards: no NaN or inf ever leaves the engine."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finite", "safe_div"]


def finite(t: Tensor) -> Tensor:
    """Replace NaN by 0 and +-inf by the dtype's largest finite values (last resort)."""
    if not t.is_floating_point():
        return t
    return torch.nan_to_num(t, nan=0.0)


def safe_div(num: Tensor, den: Tensor, *, eps: float = 1e-12, zero: float = 0.0) -> Tensor:
    """``num / den`` where ``|den| > eps``, else ``zero`` (no 0/0, no x/0).

    Args:
        num: numerator.
        den: denominator, broadcastable against ``num``.
        eps: magnitude under which the denominator counts as zero.
        zero: value used where the denominator is (near) zero.
    """
    ok = den.abs() > eps
    out = num / torch.where(ok, den, torch.ones_like(den))
    return finite(torch.where(ok, out, torch.full_like(out, zero)))

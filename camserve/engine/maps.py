"""Map helpers: min-max normalisation and bilinear upsampling.

The localization box (003 eq. 3) is :func:`camserve.render.localization_box`.

These work on any ``(..., h, w)`` stack of maps, e.g. the ``(N, K, h, w)``
tensors of :class:`~camserve.engine.Explanation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.engine._numerics import finite
from camserve.errors import InvalidRequestError

__all__ = ["normalize", "upsample"]


def normalize(maps: Tensor) -> Tensor:
    """Min-max normalise each ``(h, w)`` map to ``[0, 1]``; a constant map becomes zeros.

    Each map is first divided by its largest magnitude, so the range cannot
    overflow even for values near the dtype's limits.

    Args:
        maps: ``(..., h, w)`` float tensor.

    Returns:
        float32 tensor of the same shape.
    """
    if maps.dim() < 2:
        raise InvalidRequestError(
            f"maps must have at least 2 dims (h, w), got shape {tuple(maps.shape)}"
        )
    x = finite(maps.float())
    if x.numel() == 0:
        return x
    flat = x.flatten(-2)
    scale = flat.abs().amax(dim=-1, keepdim=True)
    flat = flat / torch.where(scale > 0, scale, torch.ones_like(scale))
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    rng = hi - lo
    ok = rng > 1e-12
    out = torch.where(
        ok, (flat - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(flat)
    )
    return out.clamp_(0.0, 1.0).view_as(x)


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``(..., h, w)`` maps to ``size = (H, W)`` (align_corners=False).

    The maps are resized as they are (normalise first if that is wanted).
    """
    if len(size) != 2 or min(size) < 1:
        raise InvalidRequestError(f"size must be (H, W) with positive entries, got {tuple(size)}")
    if maps.dim() < 2:
        raise InvalidRequestError(
            f"maps must have at least 2 dims (h, w), got shape {tuple(maps.shape)}"
        )
    lead = maps.shape[:-2]
    x = maps.float().reshape(-1, 1, *maps.shape[-2:])
    if tuple(x.shape[-2:]) != (int(size[0]), int(size[1])):
        x = F.interpolate(
            x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False
        )
    return finite(x.reshape(*lead, int(size[0]), int(size[1])))

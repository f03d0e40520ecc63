"""Map helpers: min-max normalisation, bilinear upsampling, localization boxes.

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

__all__ = ["localization_box", "normalize", "upsample"]


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


def _components(mask: Tensor) -> Tensor:
    """4-connected component labels of a bool ``(H, W)`` mask (0 = background)."""
    h, w = mask.shape
    big = h * w + 1
    labels = torch.where(
        mask,
        torch.arange(1, h * w + 1, device=mask.device).view(h, w),
        torch.full((h, w), big, device=mask.device),
    )
    while True:
        padded = F.pad(labels.float()[None, None], (1, 1, 1, 1), value=float(big))[0, 0]
        neigh = (
            torch.stack(
                [
                    padded[1:-1, 1:-1],
                    padded[:-2, 1:-1],
                    padded[2:, 1:-1],
                    padded[1:-1, :-2],
                    padded[1:-1, 2:],
                ]
            )
            .amin(dim=0)
            .long()
        )
        new = torch.where(mask, neigh, labels)
        if torch.equal(new, labels):
            break
        labels = new
    return torch.where(mask, labels, torch.zeros_like(labels))


def localization_box(map2d: Tensor, threshold: float = 0.15) -> tuple[int, int, int, int]:
    """Bounding box of the largest connected region above ``threshold * max`` (003 eq. 3).

    Args:
        map2d: ``(H, W)`` map, usually upsampled to the image size.
        threshold: fraction of the map's maximum (003 uses 15%).

    Returns:
        ``(x0, y0, x1, y1)`` inclusive pixel coordinates; the whole image when
        the map has no positive value.
    """
    if map2d.dim() != 2:
        raise InvalidRequestError(f"map2d must be (H, W), got shape {tuple(map2d.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequestError(f"threshold must be in [0, 1], got {threshold}")
    m = finite(map2d.detach().float().cpu())
    h, w = m.shape
    top = float(m.max())
    if top <= 0.0:
        return (0, 0, w - 1, h - 1)
    labels = _components(m >= threshold * top)
    counts = torch.bincount(labels.flatten(), minlength=2)
    counts[0] = 0
    ys, xs = torch.nonzero(labels == int(counts.argmax()), as_tuple=True)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))

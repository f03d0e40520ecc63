"""The weak-localization box of a map, fast enough to compute for every map of a response.

Same definition and result as :func:`camserve.engine.maps.localization_box`
(003 eq. 3: the bounding box of the largest 4-connected region above
``threshold * max``; ties go to the region whose first pixel comes first in
row-major order; the whole image when the map has no positive value), computed
with a run-length union-find instead of iterated label propagation: a few
hundred microseconds on a 64x64 map instead of milliseconds. Tests check that
both agree.
"""

from __future__ import annotations

import numpy as np
import torch

from camserve.errors import InvalidRequestError

__all__ = ["localization_box"]


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def localization_box(map2d: torch.Tensor, threshold: float = 0.15) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` inclusive: the box of the largest region above ``threshold * max``.

    Args:
        map2d: ``(H, W)`` map (usually normalised and upsampled to the input size).
        threshold: fraction of the map's maximum (003 uses 15%).
    """
    if map2d.dim() != 2:
        raise InvalidRequestError(f"map2d must be (H, W), got shape {tuple(map2d.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequestError(f"threshold must be in [0, 1], got {threshold}")
    m = torch.nan_to_num(map2d.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    h, w = m.shape
    top = float(m.max())
    if top <= 0.0:
        return (0, 0, w - 1, h - 1)
    mask = (m >= threshold * top).numpy()
    # Runs of True per row: (row, start, end exclusive), in row-major order.
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    rows = rows_s.tolist()
    s_list, e_list = starts.tolist(), ends.tolist()
    n = len(rows)
    parent = list(range(n))
    # Union runs of consecutive rows whose column ranges overlap (4-connectivity).
    row_first = np.searchsorted(rows_s, np.arange(h + 1)).tolist()
    for r in range(1, h):
        a, a_end = row_first[r - 1], row_first[r]
        b, b_end = row_first[r], row_first[r + 1]
        while a < a_end and b < b_end:
            if s_list[a] < e_list[b] and s_list[b] < e_list[a]:
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if e_list[a] <= e_list[b]:
                a += 1
            else:
                b += 1
    size: dict[int, int] = {}
    box: dict[int, list[int]] = {}
    for i in range(n):
        root = _find(parent, i)
        size[root] = size.get(root, 0) + e_list[i] - s_list[i]
        bx = box.get(root)
        if bx is None:
            box[root] = [s_list[i], rows[i], e_list[i] - 1, rows[i]]
        else:
            bx[0] = min(bx[0], s_list[i])
            bx[2] = max(bx[2], e_list[i] - 1)
            bx[3] = max(bx[3], rows[i])
    # Largest region; ties to the smallest root, the region whose first pixel comes first.
    best = min(size, key=lambda root: (-size[root], root))
    x0, y0, x1, y1 = box[best]
    return (x0, y0, x1, y1)

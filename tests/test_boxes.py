"""localization_box (003 eq. 3) against a slow label-propagation reference on many maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camserve.errors import InvalidRequestError
from camserve.render import localization_box


def components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected labels by iterated min-label propagation (0 = background)."""
    h, w = mask.shape
    big = h * w + 1
    labels = torch.where(mask, torch.arange(1, h * w + 1).view(h, w), torch.full((h, w), big))
    while True:
        padded = F.pad(labels.float()[None, None], (1, 1, 1, 1), value=float(big))[0, 0]
        neigh = torch.stack(
            [
                padded[1:-1, 1:-1],
                padded[:-2, 1:-1],
                padded[2:, 1:-1],
                padded[1:-1, :-2],
                padded[1:-1, 2:],
            ]
        ).amin(dim=0)
        new = torch.where(mask, neigh.long(), labels)
        if torch.equal(new, labels):
            return torch.where(mask, labels, torch.zeros_like(labels))
        labels = new


def reference_box(m: torch.Tensor, threshold: float = 0.15) -> tuple[int, int, int, int]:
    """The slow reference: largest component (ties: smallest first pixel), its bounding box."""
    h, w = m.shape
    top = float(m.max())
    if top <= 0.0:
        return (0, 0, w - 1, h - 1)
    labels = components(m >= threshold * top)
    counts = torch.bincount(labels.flatten(), minlength=2)
    counts[0] = 0
    ys, xs = torch.nonzero(labels == int(counts.argmax()), as_tuple=True)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def blobs(seed: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, max(2, h // 8), max(2, w // 8), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("seed", range(60))
def test_same_box_as_the_reference(seed: int) -> None:
    h, w = [(64, 64), (17, 33), (40, 7), (1, 9), (9, 1)][seed % 5]
    m = (
        blobs(seed, h, w)
        if seed % 3
        else torch.rand(h, w, generator=torch.Generator().manual_seed(seed))
    )
    for threshold in (0.0, 0.15, 0.5, 0.9, 1.0):
        assert localization_box(m, threshold) == reference_box(m, threshold), (seed, threshold)


def test_ties_snakes_and_degenerate_maps() -> None:
    two = torch.zeros(8, 8)
    two[0:2, 5:7] = 1.0  # same size, first pixel earlier in row-major order
    two[5:7, 0:2] = 1.0
    assert localization_box(two) == reference_box(two) == (5, 0, 6, 1)
    snake = torch.zeros(9, 9)
    snake[0, :] = snake[:, 8] = snake[8, :] = snake[2:, 0] = snake[2, :7] = 1.0
    assert localization_box(snake) == reference_box(snake)
    assert localization_box(torch.zeros(4, 5)) == (0, 0, 4, 3)
    assert localization_box(torch.full((3, 3), -1.0)) == reference_box(torch.full((3, 3), -1.0))
    with pytest.raises(InvalidRequestError, match="must be"):
        localization_box(torch.zeros(2, 2, 2))
    with pytest.raises(InvalidRequestError, match="threshold"):
        localization_box(torch.zeros(2, 2), 1.5)


def test_localization_box_takes_the_largest_component() -> None:
    m = torch.zeros(20, 30)
    m[2:5, 3:6] = 1.0  # small blob, the maximum
    m[10:18, 12:25] = 0.5  # larger blob above 15%
    m[0, 29] = 0.1  # under the threshold
    assert localization_box(m) == (12, 10, 24, 17)
    assert localization_box(m, threshold=0.9) == (3, 2, 5, 4)
    assert localization_box(torch.zeros(5, 6)) == (0, 0, 5, 4)

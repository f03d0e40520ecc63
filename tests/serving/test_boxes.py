"""The serving box equals the engine's localization_box (003 eq. 3) on many maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camserve.engine.maps import localization_box as engine_box
from camserve.errors import InvalidRequestError
from camserve.serving.boxes import localization_box


def blobs(seed: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, max(2, h // 8), max(2, w // 8), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("seed", range(60))
def test_same_box_as_the_engine(seed: int) -> None:
    h, w = [(64, 64), (17, 33), (40, 7), (1, 9), (9, 1)][seed % 5]
    m = (
        blobs(seed, h, w)
        if seed % 3
        else torch.rand(h, w, generator=torch.Generator().manual_seed(seed))
    )
    for threshold in (0.0, 0.15, 0.5, 0.9, 1.0):
        assert localization_box(m, threshold) == engine_box(m, threshold), (seed, threshold)


def test_ties_snakes_and_degenerate_maps() -> None:
    two = torch.zeros(8, 8)
    two[0:2, 5:7] = 1.0  # same size, first pixel earlier in row-major order
    two[5:7, 0:2] = 1.0
    assert localization_box(two) == engine_box(two) == (5, 0, 6, 1)
    snake = torch.zeros(9, 9)
    snake[0, :] = snake[:, 8] = snake[8, :] = snake[2:, 0] = snake[2, :7] = 1.0
    assert localization_box(snake) == engine_box(snake)
    assert localization_box(torch.zeros(4, 5)) == (0, 0, 4, 3)
    assert localization_box(torch.full((3, 3), -1.0)) == engine_box(torch.full((3, 3), -1.0))
    with pytest.raises(InvalidRequestError, match="must be"):
        localization_box(torch.zeros(2, 2, 2))
    with pytest.raises(InvalidRequestError, match="threshold"):
        localization_box(torch.zeros(2, 2), 1.5)

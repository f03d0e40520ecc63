"""Render: scipy boxes equal the slow reference's, matplotlib colours, overlays, box scaling."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import colormaps
from PIL import Image

from camserve.errors import InvalidRequestError
from camserve.render import (
    colorize,
    localization_box,
    localization_boxes,
    overlay,
    overlay_png,
    scale_box,
)
from tests.test_boxes import reference_box


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 24),
    st.integers(2, 24),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 0.15, 0.5, 0.9, 1.0]),
)
def test_boxes_equal_the_references(h: int, w: int, seed: int, threshold: float) -> None:
    m = torch.from_numpy(np.random.default_rng(seed).standard_normal((h, w)).astype(np.float32))
    assert localization_box(m, threshold) == reference_box(m, threshold)
    assert localization_box(m.numpy(), threshold) == reference_box(m, threshold)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(2, 20),
    st.integers(2, 20),
    st.integers(0, 2**31 - 1),
)
def test_boxes_of_many_maps_at_once_equal_the_references_one_by_one(
    n: int, h: int, w: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, h, w)).astype(np.float32)
    maps[rng.random(n) < 0.3] = -1.0  # maps with no positive value: the whole map
    maps = np.where(rng.random((n, h, w)) < 0.2, maps.round(), maps)  # ties of region sizes
    thresholds = rng.choice([0.0, 0.15, 0.5, 0.9, 1.0], size=n).tolist()
    got = localization_boxes(maps, thresholds)
    want = [reference_box(torch.from_numpy(m), t) for m, t in zip(maps, thresholds, strict=True)]
    assert got == want
    assert localization_boxes(torch.from_numpy(maps), 0.15) == [
        reference_box(torch.from_numpy(m), 0.15) for m in maps
    ]


def test_many_boxes_refuse_wrong_shapes_and_thresholds() -> None:
    assert localization_boxes(np.zeros((0, 4, 4), np.float32)) == []
    with pytest.raises(InvalidRequestError, match="must be"):
        localization_boxes(np.zeros((4, 4), np.float32))
    with pytest.raises(InvalidRequestError, match="2 thresholds for 3 maps"):
        localization_boxes(np.zeros((3, 4, 4), np.float32), [0.1, 0.2])
    with pytest.raises(InvalidRequestError, match="threshold"):
        localization_boxes(np.zeros((2, 4, 4), np.float32), [0.1, -0.2])


def test_box_of_the_largest_region_and_edge_cases() -> None:
    m = np.zeros((10, 12), np.float32)
    m[1:3, 1:3] = 1.0  # 4 pixels
    m[5:9, 6:11] = 0.9  # 20 pixels: the largest region
    assert localization_box(m, 0.5) == (6, 5, 10, 8)
    assert localization_box(np.zeros((4, 5), np.float32)) == (0, 0, 4, 3)
    with pytest.raises(InvalidRequestError, match="must be"):
        localization_box(np.zeros(3, np.float32))
    with pytest.raises(InvalidRequestError, match="threshold"):
        localization_box(m, 1.5)


def test_colours_are_matplotlibs_jet() -> None:
    v = np.linspace(0, 1, 11, dtype=np.float32)[None]
    want = colormaps["jet"](v, bytes=True)[..., :3]
    np.testing.assert_array_equal(colorize(v), want)
    assert colorize(np.array([[np.nan, 2.0]], np.float32)).dtype == np.uint8


def test_overlay_blends_and_encodes_a_png() -> None:
    norm = np.zeros((6, 4), np.float32)
    norm[0, 0] = 1.0
    image = np.full((6, 4, 3), 100, np.uint8)
    out = overlay(norm, image, alpha=0.5)
    cold = colormaps["jet"](0.0, bytes=True)[:3]
    np.testing.assert_allclose(out[5, 3], (np.array(cold) + 100) / 2, atol=1)
    img = Image.open(io.BytesIO(overlay_png(norm, image)))
    assert img.format == "PNG" and img.size == (4, 6)
    np.testing.assert_array_equal(np.asarray(img), out)


def test_scale_box_covers_the_same_pixels() -> None:
    assert scale_box((0, 0, 63, 63), (64, 64), (128, 32)) == (0, 0, 127, 31)
    assert scale_box((10, 20, 10, 20), (64, 64), (128, 128)) == (20, 40, 21, 41)

"""The audit metrics on small hand-made cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from camserve.audit import metrics as M
from camserve.errors import InvalidRequestError


def _blob(h: int, w: int, box: tuple[int, int, int, int], value: float = 1.0) -> np.ndarray:
    m = np.zeros((h, w))
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = value
    return m


# ---------------------------------------------------------------- localization


def test_weak_localization_takes_the_largest_component() -> None:
    m = _blob(32, 32, (2, 2, 5, 5)) + _blob(32, 32, (10, 12, 25, 20), 0.5)
    # Both regions are above 15% of the max; the second is larger.
    assert M.weak_localization_box(m, 0.15) == (10, 12, 25, 20)
    # Above 60% only the small bright one survives.
    assert M.weak_localization_box(m, 0.6) == (2, 2, 5, 5)
    # Torch tensors are accepted alike.
    assert M.weak_localization_box(torch.from_numpy(m), 0.15) == (10, 12, 25, 20)


def test_weak_localization_is_4_connected_and_blank_maps_cover_the_image() -> None:
    m = np.zeros((8, 8))
    m[1, 1] = m[2, 2] = m[3, 3] = 1.0  # diagonal: three 1-pixel components
    m[6, 5] = m[6, 6] = 1.0  # a 2-pixel component
    assert M.weak_localization_box(m) == (5, 6, 6, 6)
    assert M.weak_localization_box(np.zeros((4, 6))) == (0, 0, 5, 3)


def test_weak_localization_rejects_bad_input() -> None:
    with pytest.raises(InvalidRequestError, match="threshold"):
        M.weak_localization_box(np.ones((4, 4)), 1.5)
    with pytest.raises(InvalidRequestError, match="2 dims"):
        M.weak_localization_box(np.ones((2, 4, 4)))
    with pytest.raises(InvalidRequestError, match="NaN"):
        M.weak_localization_box(np.full((4, 4), np.nan))


def test_box_iou_and_the_003_criterion() -> None:
    assert M.box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert M.box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0
    assert M.box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert M.localization_iou_threshold(10, 10) == pytest.approx(100 / 400)
    assert M.localization_iou_threshold(200, 300) == 0.5
    # A 10x10 true box needs IoU 0.25 only: 50/150 = 0.33 is enough.
    assert M.localization_correct((5, 0, 14, 9), [(0, 0, 9, 9)])
    assert not M.localization_correct((5, 0, 14, 9), [(0, 0, 99, 99)])


def test_localization_error_top1_and_top5() -> None:
    truths = {3: [(0.0, 0.0, 9.0, 9.0)]}
    good, bad = (0, 0, 9, 9), (50, 50, 60, 60)
    assert M.localization_error([3, 1], [good, bad], truths, k=1) == 0.0
    # Right class but wrong place.
    assert M.localization_error([3, 1], [bad, good], truths, k=1) == 1.0
    # The true class second: a top-1 error, not a top-5 one.
    assert M.localization_error([1, 3, 4, 5, 6], [good, good, bad, bad, bad], truths, k=1) == 1.0
    assert M.localization_error([1, 3, 4, 5, 6], [good, good, bad, bad, bad], truths, k=5) == 0.0
    with pytest.raises(InvalidRequestError, match="k=5"):
        M.localization_error([1], [good], truths, k=5)


# ---------------------------------------------------------------- pointing game


def test_pointing_hit_boxes_masks_tolerance() -> None:
    m = np.zeros((20, 20))
    m[5, 12] = 1.0  # (x=12, y=5)
    assert M.pointing_hit(m, [(10, 0, 15, 8)])
    assert not M.pointing_hit(m, [(0, 0, 9, 19)])
    assert M.pointing_hit(m, [(0, 0, 9, 19)], tolerance=3)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5, 14] = True
    assert not M.pointing_hit(m, mask=mask)
    assert M.pointing_hit(m, mask=mask, tolerance=2)
    assert M.pointing_game([True, True, False, True]) == 0.75
    assert math.isnan(M.pointing_game([]))


def test_pointing_game_top5_with_rejection() -> None:
    pc = M.pointing_game_top5(
        maxima=[1.0, 0.9, 0.2, 0.7, 0.1],
        present=[True, True, True, False, False],
        on_object=[True, False, True, False, False],
        threshold=0.5,
    )
    # hit; accepted off the object; rejected though present; false alarm; right rejection
    assert (pc.hits, pc.misses, pc.false_alarms, pc.rejections) == (1, 2, 1, 1)
    assert pc.accuracy == pytest.approx(2 / 5)
    assert pc.recall == pytest.approx(1 / 3)
    with pytest.raises(InvalidRequestError):
        M.pointing_game_top5([1.0], [True, False], [True])


# ---------------------------------------------------------------- confidence


def test_average_drop_is_normalised_and_increase_counts() -> None:
    y, o = [0.8, 0.5, 0.4], [0.4, 0.6, 0.4]
    # (0.4/0.8 + 0 + 0) / 3; pytorch-grad-cam's unnormalised drop would be 0.4/3.
    assert M.average_drop(y, o) == pytest.approx(0.5 / 3)
    assert M.increase_in_confidence(y, o) == pytest.approx(1 / 3)
    assert M.average_drop(np.array([0.0, 0.5]), np.array([0.1, 0.25])) == pytest.approx(0.5)
    with pytest.raises(InvalidRequestError, match="differ"):
        M.average_drop([1.0], [1.0, 2.0])


def test_explanation_map_multiplies() -> None:
    img = np.ones((3, 2, 2)) * 0.5
    m = np.array([[1.0, 0.0], [0.5, 0.25]])
    np.testing.assert_allclose(M.explanation_map(img, m)[1], m * 0.5)
    with pytest.raises(InvalidRequestError, match="map shape"):
        M.explanation_map(img, np.ones((3, 3)))


def test_relative_performance_geometric_mean_and_filter() -> None:
    new, ref = [2.0, 8.0, 0.3], [1.0, 2.0, 0.9]
    r = M.relative_performance(new, ref, original=[0.9, 0.8, 0.4])
    # The third image is scored under 0.5: ratios 2 and 4 remain.
    assert r["count"] == 2
    assert r["relative_performance"] == pytest.approx(math.sqrt(8))
    assert r["log_mean"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert r["log_std"] == pytest.approx((math.log(4) - math.log(2)) / 2)
    assert M.relative_performance([0.5], [0.5])["relative_performance"] == pytest.approx(1.0)
    assert math.isnan(M.relative_performance([0.0], [0.5])["relative_performance"])


# ---------------------------------------------------------------- deletion / insertion


def test_deletion_removes_the_most_salient_first() -> None:
    img = np.arange(1, 17, dtype=float).reshape(1, 4, 4)
    sal = np.arange(16, dtype=float).reshape(4, 4)  # the last pixel is the most salient
    seq = M.deletion_images(img, sal, steps=4, baseline=0.0)
    assert seq.shape == (5, 1, 4, 4)
    np.testing.assert_array_equal(seq[0], img)
    assert (seq[1].ravel()[12:] == 0).all() and (seq[1].ravel()[:12] > 0).all()
    assert (seq[4] == 0).all()


def test_insertion_from_a_baseline_is_deletion_reversed() -> None:
    rng = np.random.default_rng(0)
    img, sal = rng.random((3, 8, 8)), rng.random((8, 8))
    ins = M.insertion_images(img, sal, steps=8, baseline=0.0)
    np.testing.assert_array_equal(ins[0], 0.0)
    np.testing.assert_array_equal(ins[-1], img)
    dele = M.deletion_images(img, sal, steps=8)
    # Pixels inserted by step s are those deleted by step s.
    np.testing.assert_array_equal(ins[3] != 0, dele[3] == 0)
    blurred = M.insertion_images(img, sal, steps=8)[0]
    assert blurred.std() < img.std()  # starts from the blur


def test_auc_trapezoid() -> None:
    assert M.auc([0.7, 0.7, 0.7]) == pytest.approx(0.7)
    assert M.auc(np.linspace(1.0, 0.0, 11)) == pytest.approx(0.5)
    assert M.auc([1.0, 0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.125)
    with pytest.raises(InvalidRequestError):
        M.auc([1.0])


# ---------------------------------------------------------------- ROAD


def test_road_imputation_recovers_constant_and_linear_images() -> None:
    ys, xs = np.mgrid[0:16, 0:16].astype(float)
    ramp = np.stack([0.1 * xs + 0.05 * ys, np.full((16, 16), 0.3), 0.02 * ys])
    sal = np.random.default_rng(0).random((16, 16)) * 0.1
    sal[4:12, 5:11] += 1.0  # the 48 most salient pixels, away from the border
    # MoRF at the 85th percentile removes the top 15% (38 pixels), all inside that region.
    morf, _ = M.road_images(ramp, sal, percentiles=(85,), noise=0.0)
    removed = sal >= np.percentile(sal, 85)
    assert removed.sum() == 39 and not removed[:4].any()
    # The neighbour weights are symmetric, so a linear image is its own imputation.
    np.testing.assert_allclose(morf[0], ramp, atol=1e-10)
    # With noise, results depend on the seed only.
    a, _ = M.road_images(ramp, sal, percentiles=(85,), noise=0.1, seed=3)
    b, _ = M.road_images(ramp, sal, percentiles=(85,), noise=0.1, seed=3)
    c, _ = M.road_images(ramp, sal, percentiles=(85,), noise=0.1, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Kept pixels are untouched.
    np.testing.assert_array_equal(a[0][:, ~removed], ramp[:, ~removed])
    assert not np.array_equal(a[0][:, removed], ramp[:, removed])


def test_road_score_combines_lerf_and_morf() -> None:
    assert M.road_score(0.9, [0.1, 0.2], [0.9, 0.8]) == pytest.approx(((0.8) + (0.6)) / 2 / 2)
    assert M.road_score(0.5, [0.5], [0.5]) == 0.0


# ---------------------------------------------------------------- axioms


def test_conservation_and_sensitivity_residuals() -> None:
    assert M.conservation_residual(4.0, 4.0) == 0.0
    assert M.conservation_residual(3.0, -2.0) == pytest.approx(2.5)
    assert math.isnan(M.conservation_residual(1.0, 0.0))
    assert M.sensitivity_residual([1.0, 2.0], [1.0, 2.0], 3.0) == 0.0
    assert M.sensitivity_residual([1.0, 2.0], [0.0, 2.0], 2.0) == pytest.approx(0.25)


def test_alpha_summary_pools_images() -> None:
    one = {"alpha_count": 10.0, "alpha_min": 0.4, "alpha_max": 0.6, "alpha_mean": 0.5,
           "alpha_median": 0.5, "alpha_q25": 0.45, "alpha_q75": 0.55, "alpha_near_half_share": 1.0}
    two = {**one, "alpha_count": 30.0, "alpha_mean": 0.7, "alpha_max": 3.0, "alpha_median": 0.6,
           "alpha_near_half_share": 0.5}
    s = M.alpha_summary([one, two, {"alpha_count": 0.0}])
    assert s["images"] == 2 and s["alpha_count"] == 40
    assert s["alpha_mean"] == pytest.approx((5 + 21) / 40)
    assert s["alpha_max"] == 3.0 and s["alpha_median"] == pytest.approx(0.55)
    assert s["alpha_near_half_share"] == pytest.approx(0.75)


# ---------------------------------------------------------------- fidelity, contrastivity


def test_binarize_fidelity_contrastivity() -> None:
    m = np.array([[0.0, -1.0], [0.2, 0.8]])
    np.testing.assert_array_equal(M.binarize(m, 0), [[False, False], [True, True]])
    ten = np.linspace(0.1, 1.0, 10)
    assert M.binarize(ten, 10).sum() == 9 and not M.binarize(ten, 10)[0]  # 10% percentile
    np.testing.assert_array_equal(M.binarize(m, 90), [[False, False], [False, True]])
    assert not M.binarize(np.zeros((2, 2))).any()
    assert M.fidelity([1, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(0.5)
    a = np.array([1, 1, 0, 0], dtype=bool)
    assert M.contrastivity(a, [a]) == 0.0
    assert M.contrastivity(a, [~a]) == 1.0
    # Overlap of one: Hamming 2 over union 3; with the identical map: mean of 2/3 and 0.
    b = np.array([0, 1, 1, 0], dtype=bool)
    assert M.contrastivity(a, [b, a]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- rank correlation


def test_rank_correlation_at_14x14() -> None:
    rng = np.random.default_rng(0)
    m = np.kron(rng.random((14, 14)), np.ones((2, 2)))  # 2x2 blocks: pooling keeps the ranks
    assert M.rank_correlation(m, m**3) == pytest.approx(1.0)
    assert M.rank_correlation(m, -m) == pytest.approx(-1.0)
    assert math.isnan(M.rank_correlation(m, np.ones((28, 28))))
    with pytest.raises(InvalidRequestError, match="14x14"):
        M.rank_correlation(np.ones((8, 8)), np.ones((8, 8)))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_weak_localization_box_lies_in_the_image(h: int, w: int, seed: int) -> None:
    m = np.random.default_rng(seed).random((h, w))
    x0, y0, x1, y1 = M.weak_localization_box(m)
    assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
    # The maximum's pixel is above any threshold, so a box always exists around something.
    assert (m[y0 : y1 + 1, x0 : x1 + 1] >= 0.15 * m.max()).any()


# ---------------------------------------------------------------- the zoo's scenes, truth known


def test_metrics_on_zoo_scenes_with_their_own_masks() -> None:
    from camserve.zoo.scenes import generate_scenes

    for scene in generate_scenes(seed=5, count=6, kind="multi"):
        boxes = []
        for obj in scene.objects:
            x, y, w, h = obj.bbox
            box = (x, y, x + w - 1, y + h - 1)
            boxes.append(box)
            m = obj.mask.astype(float)
            # A map that is the object's mask localises it exactly and points at it.
            assert M.weak_localization_box(m) == box
            assert M.localization_correct(M.weak_localization_box(m), [box])
            assert M.pointing_hit(m, [box]) and M.pointing_hit(m, mask=obj.mask)
        if len(scene.objects) > 1:
            a, b = scene.objects[0].mask, scene.objects[1].mask
            # Two objects' masks barely overlap (occlusion), so contrastivity is near 1.
            assert M.contrastivity(M.binarize(a.astype(float)),
                                   [M.binarize(b.astype(float))]) > 0.9
            # A map on the first object does not localise the second.
            assert not M.localization_correct(M.weak_localization_box(a.astype(float)),
                                              [boxes[1]]) or M.box_iou(boxes[0], boxes[1]) > 0.2

"""Explanation-quality metrics: pure functions, arrays in, numbers out.

Nothing here runs a model. Metrics that score perturbed images come in two
halves: a function that builds the perturbed images (the caller scores them,
batched, with whatever model or service it audits) and a function that turns
the scores into the metric. Maps are ``(H, W)`` arrays (numpy or torch) at the
image's resolution unless said otherwise; images are ``(C, H, W)`` float
arrays in whatever space the model reads (pixels in ``[0, 1]`` or the
normalised input); boxes are ``(x0, y0, x1, y1)`` inclusive pixel coordinates.

Papers, cited by number as in the README: 000 / 004 Fu et al. (XGrad-CAM),
001 Selvaraju et al. (Grad-CAM, supplement), 002 Lerma and Lucas (Grad-CAM++
is Grad-CAM with positive gradients), 003 Nagy, Nimara and Qian (a
reproducibility study of Grad-CAM). Deletion and insertion are from Petsiuk et
al., *RISE* (BMVC 2018); ROAD from Rong et al., *A Consistent and Efficient
Evaluation Strategy for Attribution Methods* (ICML 2022).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from numpy.typing import NDArray
from scipy.stats import spearmanr

from camserve.errors import InvalidRequestError
from camserve.render import localization_box

__all__ = [
    "Box",
    "PointingCounts",
    "alpha_summary",
    "auc",
    "average_drop",
    "binarize",
    "box_iou",
    "conservation_residual",
    "contrastivity",
    "deletion_images",
    "explanation_map",
    "fidelity",
    "increase_in_confidence",
    "insertion_images",
    "localization_correct",
    "localization_error",
    "localization_iou_threshold",
    "pointing_game",
    "pointing_game_top5",
    "pointing_hit",
    "rank_correlation",
    "relative_performance",
    "road_images",
    "road_score",
    "sensitivity_residual",
    "weak_localization_box",
]

Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)``, inclusive pixel coordinates."""

FloatArray = NDArray[np.float64]


def _np(a: Any, name: str, dims: int | None = None) -> FloatArray:
    """A float64 numpy copy of a numpy array or torch tensor (no torch import needed)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if dims is not None and arr.ndim != dims:
        raise InvalidRequestError(f"{name} must have {dims} dims, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidRequestError(f"{name} contains NaN or inf")
    return arr


def _mean(values: FloatArray) -> float:
    return float(values.mean()) if values.size else math.nan


# ------------------------------------------------------------------ localization


def weak_localization_box(map2d: Any, threshold: float = 0.15) -> Box:
    """Box of the largest connected region above ``threshold * max(map)`` (003 eq. 3).

    The map is binarised at 15% of its maximum (003, after 001 sec. 4.1), its
    4-connected components labelled with :func:`scipy.ndimage.label`, and the
    bounding box of the largest one (by pixel count; ties to the lowest label,
    the region met first in row-major order) returned: the service's box,
    :func:`camserve.render.localization_box`, on a map checked to be finite.

    Args:
        map2d: ``(H, W)`` map, usually min-max normalised and upsampled to the image.
        threshold: fraction of the maximum, in ``[0, 1]``.

    Returns:
        ``(x0, y0, x1, y1)`` inclusive; the whole image when the map has no
        positive value (nothing is localised).

    Raises:
        InvalidRequestError: a map that is not 2-D or not finite, a threshold
            outside ``[0, 1]``.
    """
    m = _np(map2d, "map2d", 2)  # refuses a non-finite map, which render would zero
    return localization_box(m, threshold)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Jaccard index of two inclusive pixel boxes ``(x0, y0, x1, y1)`` (003 sec. 4)."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0.0, ix) * max(0.0, iy)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def localization_iou_threshold(width: float, height: float) -> float:
    """IoU a box needs to count as localised: ``min(0.5, m n / ((m + 10)(n + 10)))`` (003 eq. 3).

    ``(m, n)`` is the true box's size in pixels; small boxes need less overlap.
    """
    return min(0.5, (width * height) / ((width + 10.0) * (height + 10.0)))


def localization_correct(predicted: Sequence[float], truths: Sequence[Sequence[float]]) -> bool:
    """Whether ``predicted`` localises any of the class's true boxes (003 eq. 3)."""
    for t in truths:
        m, n = t[2] - t[0] + 1, t[3] - t[1] + 1
        if box_iou(predicted, t) >= localization_iou_threshold(m, n):
            return True
    return False


def localization_error(
    predicted_ids: Sequence[int],
    predicted_boxes: Sequence[Sequence[float]],
    truths: Mapping[int, Sequence[Sequence[float]]],
    k: int = 1,
) -> float:
    """Top-k localization error of one image: 0 when localised, 1 otherwise (ILSVRC, 001, 003).

    The image counts as localised when one of the first ``k`` predicted
    classes is a true class of the image *and* its map's box
    (:func:`weak_localization_box`) localises a true box of that class
    (:func:`localization_correct`). The data set's error is the mean over images.

    Args:
        predicted_ids: class ids by decreasing score (at least ``k``).
        predicted_boxes: the box of each predicted class's map, same order.
        truths: true class id -> its boxes.
        k: 1 or 5 in the papers.
    """
    if k < 1 or len(predicted_ids) < k or len(predicted_boxes) < k:
        raise InvalidRequestError(
            f"need at least k={k} predicted ids and boxes, got "
            f"{len(predicted_ids)} and {len(predicted_boxes)}"
        )
    for cid, box in zip(predicted_ids[:k], predicted_boxes[:k], strict=True):
        if cid in truths and localization_correct(box, truths[cid]):
            return 0.0
    return 1.0


# ------------------------------------------------------------------ pointing game


def _argmax_point(m: FloatArray) -> tuple[int, int]:
    """``(x, y)`` of the map's maximum (the first in row-major order on ties)."""
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(x), int(y)


def pointing_hit(
    map2d: Any,
    boxes: Sequence[Sequence[float]] = (),
    mask: Any = None,
    tolerance: int = 0,
) -> bool:
    """Pointing game (Zhang et al. 2016; 003 sec. 4, 001 sec. 7): is the maximum on the object?

    A hit when the map's maximum lies inside one of the class's true boxes,
    or, given ``mask``, on (within ``tolerance`` pixels of) its segmentation.
    003 checks boxes without tolerance; Zhang et al. allow 15 pixels.

    Args:
        map2d: ``(H, W)`` map at the image's resolution.
        boxes: the class's true boxes.
        mask: optional ``(H, W)`` boolean union of the class's instance masks.
        tolerance: pixels of slack around boxes and mask.
    """
    m = _np(map2d, "map2d", 2)
    x, y = _argmax_point(m)
    t = int(tolerance)
    if mask is not None:
        mk = np.asarray(mask, dtype=bool)
        if mk.shape != m.shape:
            raise InvalidRequestError(f"mask shape {mk.shape} differs from the map's {m.shape}")
        y0, y1 = max(0, y - t), min(m.shape[0], y + t + 1)
        x0, x1 = max(0, x - t), min(m.shape[1], x + t + 1)
        return bool(mk[y0:y1, x0:x1].any())
    return any(b[0] - t <= x <= b[2] + t and b[1] - t <= y <= b[3] + t for b in boxes)


def pointing_game(hits: Sequence[bool]) -> float:
    """Pointing-game accuracy ``#hits / (#hits + #misses)`` (003 sec. 4); NaN when empty."""
    return _mean(np.asarray(hits, dtype=np.float64))


@dataclass(frozen=True)
class PointingCounts:
    """Outcome counts of the top-5 pointing game with rejection (001 sec. 7).

    Attributes:
        hits: a class present in the image, accepted, its maximum on the object.
        misses: a present class accepted with its maximum off the object, or rejected.
        false_alarms: an absent class accepted.
        rejections: an absent class rejected (correct).
    """

    hits: int
    misses: int
    false_alarms: int
    rejections: int

    @property
    def accuracy(self) -> float:
        """Right decisions over all: ``(hits + rejections) / total``."""
        total = self.hits + self.misses + self.false_alarms + self.rejections
        return (self.hits + self.rejections) / total if total else math.nan

    @property
    def recall(self) -> float:
        """Present classes pointed at: ``hits / (hits + misses)``."""
        n = self.hits + self.misses
        return self.hits / n if n else math.nan


def pointing_game_top5(
    maxima: Sequence[float],
    present: Sequence[bool],
    on_object: Sequence[bool],
    threshold: float = 0.5,
) -> PointingCounts:
    """The top-5 pointing game with rejection (001 sec. 7; 003 Table 2) for one image.

    Each of the top-5 predicted classes is accepted when its map's maximum is
    at least ``threshold``, rejected otherwise (001 lets a visualisation reject
    a class it deems absent; 003 uses 0.5, with maps scaled so the maxima of
    the five maps are comparable: pass raw maxima divided by the largest of them).

    Args:
        maxima: per class, the map's maximum (comparable across the five maps).
        present: per class, whether it is a true class of the image.
        on_object: per class, :func:`pointing_hit` of its map (ignored when absent).
        threshold: rejection threshold on ``maxima``.
    """
    if not len(maxima) == len(present) == len(on_object):
        raise InvalidRequestError(
            f"maxima, present and on_object differ in length: "
            f"{len(maxima)}, {len(present)}, {len(on_object)}"
        )
    hits = misses = false_alarms = rejections = 0
    for mx, pres, on in zip(maxima, present, on_object, strict=True):
        accepted = float(mx) >= threshold
        if pres:
            if accepted and on:
                hits += 1
            else:
                misses += 1
        elif accepted:
            false_alarms += 1
        else:
            rejections += 1
    return PointingCounts(hits, misses, false_alarms, rejections)


# ------------------------------------------------------------------ confidence on explanation maps


def explanation_map(image: Any, map2d: Any) -> FloatArray:
    """Explanation map ``E = L ⊙ I`` (002 eq. 15): the image dimmed where the map is low.

    Args:
        image: ``(C, H, W)``.
        map2d: ``(H, W)`` min-max normalised map in ``[0, 1]``.

    Returns:
        ``(C, H, W)`` float64. The result is only as neutral as the space of
        ``image``: on pixels it fades to black; torchcam and pytorch-grad-cam
        multiply the normalised input, which fades to the data set's mean colour.
    """
    img = _np(image, "image", 3)
    m = _np(map2d, "map2d", 2)
    if img.shape[1:] != m.shape:
        raise InvalidRequestError(f"map shape {m.shape} differs from the image's {img.shape[1:]}")
    return img * m[None]


def average_drop(original: Sequence[float] | Any, explained: Sequence[float] | Any) -> float:
    """Average drop ``mean_i max(0, Y_i - O_i) / Y_i`` (Chattopadhay et al. 2018; 002 sec. 4).

    ``Y_i`` is the class's post-softmax score on image i, ``O_i`` on its
    explanation map (:func:`explanation_map`). Normalised by ``Y_i`` as the
    papers define it, so it lies in ``[0, 1]`` (lower is better). torchcam's
    ``ClassificationMetric`` computes the same (with ``Y + 1e-7``);
    pytorch-grad-cam's ``DropInConfidence`` returns ``max(0, Y - O)`` per
    image, *not* divided by ``Y``, so its numbers differ by that factor.
    Images with ``Y = 0`` are left out.
    """
    y = _np(original, "original").ravel()
    o = _np(explained, "explained").ravel()
    if y.shape != o.shape:
        raise InvalidRequestError(f"original and explained differ in size: {y.size} vs {o.size}")
    keep = y > 0
    return _mean(np.maximum(0.0, y[keep] - o[keep]) / y[keep])


def increase_in_confidence(
    original: Sequence[float] | Any, explained: Sequence[float] | Any
) -> float:
    """Increase in confidence ``mean_i [O_i > Y_i]`` (Chattopadhay et al. 2018; 002 sec. 4).

    The share of images whose explanation map scores higher than the image
    (higher is better). torchcam and pytorch-grad-cam define it alike.
    """
    y = _np(original, "original").ravel()
    o = _np(explained, "explained").ravel()
    if y.shape != o.shape:
        raise InvalidRequestError(f"original and explained differ in size: {y.size} vs {o.size}")
    return _mean((o > y).astype(np.float64))


def relative_performance(
    explained_new: Sequence[float] | Any,
    explained_ref: Sequence[float] | Any,
    original: Sequence[float] | Any | None = None,
    min_score: float = 0.5,
) -> dict[str, float]:
    """Relative performance of method M' against M on explanation maps (002 eq. 16-17).

    ``O'_i / O_i`` are the post-softmax scores of image i's explanation maps
    (:func:`explanation_map`) from M' and M; the data set's relative
    performance is their geometric mean ``exp(mean log(O'/O))`` (eq. 16-17);
    002 Table 2 also gives the mean and standard deviation of ``log(O'/O)``.
    Only images whose original score is above ``min_score`` count (002 keeps
    images scored above 0.5 for the right class), and only those where both
    scores are positive (a zero score has no logarithm).

    Returns:
        ``{"relative_performance", "log_mean", "log_std", "count"}``; NaN
        values when no image counts. ``log_std`` is the population standard
        deviation.
    """
    new = _np(explained_new, "explained_new").ravel()
    ref = _np(explained_ref, "explained_ref").ravel()
    if new.shape != ref.shape:
        raise InvalidRequestError(f"the two score arrays differ in size: {new.size} vs {ref.size}")
    keep = (new > 0) & (ref > 0)
    if original is not None:
        y = _np(original, "original").ravel()
        if y.shape != new.shape:
            raise InvalidRequestError(f"original has {y.size} scores, expected {new.size}")
        keep &= y > min_score
    logs = np.log(new[keep]) - np.log(ref[keep])
    if not logs.size:
        return {"relative_performance": math.nan, "log_mean": math.nan, "log_std": math.nan,
                "count": 0.0}
    return {
        "relative_performance": float(np.exp(logs.mean())),
        "log_mean": float(logs.mean()),
        "log_std": float(logs.std()),
        "count": float(logs.size),
    }


# ------------------------------------------------------------------ deletion / insertion (RISE)


def _order(map2d: FloatArray) -> NDArray[np.intp]:
    """Pixel indices by decreasing saliency; ties in row-major order (a stable sort)."""
    return np.argsort(-map2d.ravel(), kind="stable")


def _progressive(
    start: FloatArray, end: FloatArray, map2d: FloatArray, steps: int
) -> FloatArray:
    c, h, w = start.shape
    if map2d.shape != (h, w):
        raise InvalidRequestError(f"map shape {map2d.shape} differs from the image's {(h, w)}")
    if steps < 1:
        raise InvalidRequestError(f"steps must be >= 1, got {steps}")
    order = _order(map2d)
    rank = np.empty(h * w, dtype=np.intp)
    rank[order] = np.arange(h * w)
    rank2d = rank.reshape(h, w)
    out = np.empty((steps + 1, c, h, w), dtype=np.float64)
    for s in range(steps + 1):
        n = round(s * h * w / steps)
        changed = rank2d < n
        out[s] = np.where(changed[None], end, start)
    return out


def deletion_images(
    image: Any, map2d: Any, steps: int = 16, baseline: float | Any = 0.0
) -> FloatArray:
    """The images of the deletion curve (RISE, Petsiuk et al. 2018, sec. 4.1).

    Step ``s`` of ``steps`` replaces the ``round(s H W / steps)`` most salient
    pixels (ties in row-major order) by ``baseline``; step 0 is the image and
    the last step the baseline. Score them and pass the scores to :func:`auc`:
    a low area (the class score collapses early) is good.

    Args:
        image: ``(C, H, W)``.
        map2d: ``(H, W)`` saliency at the image's resolution.
        steps: number of deletion steps (RISE removes 224 pixels per step on
            224 x 224 images, i.e. 224 steps).
        baseline: a number, or a ``(C, H, W)`` image (RISE deletes to black).

    Returns:
        ``(steps + 1, C, H, W)`` float64.
    """
    img = _np(image, "image", 3)
    base = np.broadcast_to(_np(baseline, "baseline"), img.shape)
    return _progressive(img, base, _np(map2d, "map2d", 2), steps)


def insertion_images(
    image: Any,
    map2d: Any,
    steps: int = 16,
    sigma: float = 5.0,
    baseline: float | Any | None = None,
) -> FloatArray:
    """The images of the insertion curve (RISE, Petsiuk et al. 2018, sec. 4.1).

    Starts from the image blurred with a Gaussian of ``sigma`` pixels (RISE:
    kernel 11, sigma 5), or from ``baseline`` when given, and puts back the
    most salient pixels first; step ``s`` shows ``round(s H W / steps)``
    original pixels. A high area under the curve (:func:`auc`) is good.
    torchcam's ``DeletionInsertionMetric`` starts from a baseline (zeros by
    default) instead of a blur, and steps by ``ceil(H W / steps)`` pixels:
    with ``baseline=0`` and ``steps`` dividing ``H W`` the two curves coincide.

    Returns:
        ``(steps + 1, C, H, W)`` float64.
    """
    img = _np(image, "image", 3)
    if baseline is None:
        start = ndi.gaussian_filter(img, sigma=(0.0, sigma, sigma), mode="nearest", truncate=1.0)
    else:
        start = np.broadcast_to(_np(baseline, "baseline"), img.shape)
    return _progressive(start, img, _np(map2d, "map2d", 2), steps)


def auc(scores: Sequence[float] | Any) -> float:
    """Area under a deletion or insertion curve, trapezoid rule on ``x`` in ``[0, 1]``.

    ``scores[s]`` is the class score after step ``s`` of ``len(scores) - 1``
    equal steps (RISE sec. 4.1). A constant curve at ``v`` has area ``v``.
    """
    y = _np(scores, "scores").ravel()
    if y.size < 2:
        raise InvalidRequestError(f"a curve needs at least 2 points, got {y.size}")
    return float(((y[:-1] + y[1:]) / 2.0).mean())


# ------------------------------------------------------------------ ROAD


_NEIGHBOURS = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)


def _impute(img: FloatArray, removed: NDArray[np.bool_], noise: float,
            rng: np.random.Generator) -> FloatArray:
    """Noisy linear imputation (ROAD, Rong et al. 2022, sec. 4).

    Every removed pixel takes the weighted mean of its 8 neighbours (weights
    1/6 for the 4 direct ones, 1/12 for the diagonals, renormalised at the
    border), which is a sparse linear system over the removed pixels, solved
    per channel, then Gaussian noise of std ``noise`` is added.
    """
    c, h, w = img.shape
    flat_removed = removed.ravel()
    idx = np.flatnonzero(flat_removed)
    out = img.reshape(c, -1).copy()
    if idx.size == 0:
        return out.reshape(c, h, w)
    var = np.full(h * w, -1, dtype=np.intp)
    var[idx] = np.arange(idx.size)
    ys, xs = np.divmod(idx, w)
    rows: list[NDArray[np.intp]] = []
    cols: list[NDArray[np.intp]] = []
    vals: list[FloatArray] = []
    rhs = np.zeros((idx.size, c))
    total = np.zeros(idx.size)
    for (dy, dx), wt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        total[ok] += wt
        nb = ny[ok] * w + nx[ok]
        eq = np.flatnonzero(ok)
        unknown = flat_removed[nb]
        rows.append(eq[unknown])
        cols.append(var[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), wt))
        rhs[eq[~unknown]] -= wt * out[:, nb[~unknown]].T
    rows.append(np.arange(idx.size))
    cols.append(np.arange(idx.size))
    vals.append(-total)
    a = sp.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(idx.size, idx.size),
    )
    sol = np.asarray(spla.spsolve(a, rhs)).reshape(idx.size, c)
    if noise:
        sol = sol + noise * rng.standard_normal(sol.shape)
    out[:, idx] = sol.T
    return out.reshape(c, h, w)


def road_images(
    image: Any,
    map2d: Any,
    percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    noise: float = 0.01,
    seed: int = 0,
) -> tuple[FloatArray, FloatArray]:
    """The imputed images of ROAD (Rong et al. 2022), most- and least-relevant first.

    For each percentile ``p`` (pytorch-grad-cam's convention, followed so the
    numbers compare): MoRF removes the pixels whose saliency is at or above
    the ``p``-th percentile of the map (``100 - p`` % most relevant), LeRF
    those at or above the ``p``-th percentile of ``1 - map`` (the least
    relevant); removed pixels are filled by noisy linear imputation. The noise
    comes from a generator seeded with ``seed`` (pytorch-grad-cam draws it from
    torch's global generator), so results are reproducible.

    Args:
        image: ``(C, H, W)``.
        map2d: ``(H, W)`` min-max normalised saliency.
        percentiles: the removal thresholds.
        noise: std of the imputation noise, in the image's units.
        seed: seed of the noise.

    Returns:
        ``(morf, lerf)``, each ``(len(percentiles), C, H, W)`` float64.
    """
    img = _np(image, "image", 3)
    m = _np(map2d, "map2d", 2)
    if m.shape != img.shape[1:]:
        raise InvalidRequestError(f"map shape {m.shape} differs from the image's {img.shape[1:]}")
    rng = np.random.default_rng(seed)
    morf = np.empty((len(percentiles), *img.shape))
    lerf = np.empty_like(morf)
    for i, p in enumerate(percentiles):
        morf[i] = _impute(img, m >= np.percentile(m, p), noise, rng)
        inv = 1.0 - m
        lerf[i] = _impute(img, inv >= np.percentile(inv, p), noise, rng)
    return morf, lerf


def road_score(original: float, morf: Sequence[float] | Any, lerf: Sequence[float] | Any) -> float:
    """ROAD combined score ``mean_p (LeRF_p - MoRF_p) / 2`` of score changes (pytorch-grad-cam).

    ``morf`` and ``lerf`` are the class scores of :func:`road_images`; each
    is taken relative to the ``original`` score (pytorch-grad-cam's
    ``ROADCombined``: ``(lerf - morf) / 2`` of score differences, which equals
    ``(LeRF - MoRF) / 2`` of the raw scores). Higher is better: removing the
    least relevant pixels should keep the score, the most relevant drop it.
    """
    mo = _np(morf, "morf").ravel() - float(original)
    le = _np(lerf, "lerf").ravel() - float(original)
    if mo.shape != le.shape or not mo.size:
        raise InvalidRequestError(
            f"morf and lerf must be non-empty and alike: {mo.size}, {le.size}"
        )
    return float(((le - mo) / 2.0).mean())


# ------------------------------------------------------------------ axioms (000 / 004)


def conservation_residual(map_sum: float, score: float) -> float:
    """Conservation residual ``|sum_xy L^c - S^c| / |S^c|`` (004 eq. 4; 000 eq. 1).

    For a ReLU network ``S^c = sum_k sum_xy (dS^c/dF_k) F_k + eps``; a map that
    conserves the score sums to it. ``map_sum`` is the sum of the raw map over
    the layer's positions (before normalising or upsampling). NaN when the
    score is 0.
    """
    s = float(score)
    return abs(float(map_sum) - s) / abs(s) if s != 0 else math.nan


def sensitivity_residual(contributions: Any, drops: Any, score: float) -> float:
    """Sensitivity residual ``mean_k |sum_xy w_k F_k - (S - S_{F \\ F_k})| / |S|`` (004 eq. 5; 000).

    The sensitivity axiom asks that feature map k's share of the map,
    ``sum_xy w_k F_k``, equal the score's drop when that map is removed;
    ``zeta(F; k)`` is the difference. Here averaged over channels and
    divided by ``|S|`` so models compare.

    Args:
        contributions: ``(K,)`` per channel, ``w_k * sum_xy F_k``.
        drops: ``(K,)`` per channel, ``S - S`` with channel k zeroed.
        score: ``S`` on the image.
    """
    c = _np(contributions, "contributions").ravel()
    d = _np(drops, "drops").ravel()
    if c.shape != d.shape or not c.size:
        raise InvalidRequestError(f"contributions and drops must be non-empty and alike: "
                                  f"{c.size}, {d.size}")
    s = float(score)
    return float(np.abs(c - d).mean() / abs(s)) if s != 0 else math.nan


# ------------------------------------------------------------------ Grad-CAM++ alphas (002)


def alpha_summary(stats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Grad-CAM++ alpha statistics over many explanations (002 sec. 3.3, Fig. 3-4).

    Each item is the engine's ``stats["gradcampp"]`` of one image (computed
    over its non-zero alphas). Returns the count of non-zero alphas, their
    overall extremes and mean, and over images the median of the medians,
    the mean quartiles, and the mean share of alphas within 0.05 of 1/2
    (002 finds most alphas near 1/2).
    """
    items = [s for s in stats if s.get("alpha_count", 0.0) > 0]
    if not items:
        return {"alpha_count": 0.0, "images": 0.0}
    count = sum(s["alpha_count"] for s in items)
    return {
        "images": float(len(items)),
        "alpha_count": float(count),
        "alpha_min": float(min(s["alpha_min"] for s in items)),
        "alpha_max": float(max(s["alpha_max"] for s in items)),
        "alpha_mean": float(sum(s["alpha_mean"] * s["alpha_count"] for s in items) / count),
        "alpha_median": float(np.median([s["alpha_median"] for s in items])),
        "alpha_q25": float(np.mean([s["alpha_q25"] for s in items])),
        "alpha_q75": float(np.mean([s["alpha_q75"] for s in items])),
        "alpha_near_half_share": float(np.mean([s["alpha_near_half_share"] for s in items])),
    }


# ------------------------------------------------------------------ fidelity, contrastivity (003)


def binarize(map2d: Any, percentile: float = 10.0) -> NDArray[np.bool_]:
    """Binary map: pixels at or above the ``percentile``-th percentile of the positive values (003).

    003 sec. 5 binarises at the 1% or 10% percentile of a map's positive
    values, so methods with different value ranges (Grad-CAM is non-negative,
    IG and SHAP signed) compare. A map with no positive value gives all False.
    """
    m = _np(map2d, "map2d")
    pos = m[m > 0]
    if not pos.size:
        return np.zeros(m.shape, dtype=bool)
    return np.asarray(m >= np.percentile(pos, percentile), dtype=bool)


def fidelity(correct_before: Sequence[bool] | Any, correct_after: Sequence[bool] | Any) -> float:
    """Fidelity (003 sec. 5, after Pope et al. 2019): accuracy lost when the highlights are masked.

    ``correct_before[i]``: the model classifies image i right;
    ``correct_after[i]``: it still does with the pixels of the binarised map
    (:func:`binarize`) set to the baseline. Fidelity is
    ``mean(before) - mean(after)``; higher means the highlighted pixels matter.
    """
    b = _np(correct_before, "correct_before").ravel()
    a = _np(correct_after, "correct_after").ravel()
    if a.shape != b.shape:
        raise InvalidRequestError(f"before and after differ in size: {b.size} vs {a.size}")
    return _mean(b) - _mean(a) if b.size else math.nan


def contrastivity(positive: Any, negatives: Sequence[Any]) -> float:
    """Contrastivity ``mean_j d_H(v+, v_j) / |v+ ∨ v_j|`` (003 sec. 5, after Pope et al. 2019).

    The Hamming distance of the positive class's binary map and each negative
    class's, divided by the size of their union, averaged over the negatives
    (003's extension to many classes). Two empty maps count as identical (0).
    """
    pos = np.asarray(positive, dtype=bool)
    if not negatives:
        raise InvalidRequestError("contrastivity needs at least one negative map")
    values = []
    for neg in negatives:
        n = np.asarray(neg, dtype=bool)
        if n.shape != pos.shape:
            raise InvalidRequestError(f"map shapes differ: {pos.shape} vs {n.shape}")
        union = int((pos | n).sum())
        values.append(int((pos ^ n).sum()) / union if union else 0.0)
    return float(np.mean(values))


# ------------------------------------------------------------------ rank correlation (003)


def _pool(m: FloatArray, size: int) -> FloatArray:
    """Area-average ``m`` onto a ``size x size`` grid (each cell the mean of its pixels)."""
    h, w = m.shape
    ys = np.linspace(0, h, size + 1).round().astype(int)
    xs = np.linspace(0, w, size + 1).round().astype(int)
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            out[i, j] = m[ys[i]:max(ys[i + 1], ys[i] + 1), xs[j]:max(xs[j + 1], xs[j] + 1)].mean()
    return out


def rank_correlation(map2d: Any, occlusion_map: Any, size: int = 14) -> float:
    """Spearman's rho between a map and an occlusion map, both at ``size x size`` (003 sec. 4).

    003 (following 001 sec. 5.1) downsamples both maps to 14 x 14 (here by
    area averaging), flattens and ranks them. NaN when either map is constant.
    """
    a = _np(map2d, "map2d", 2)
    b = _np(occlusion_map, "occlusion_map", 2)
    if min(a.shape) < size or min(b.shape) < size:
        raise InvalidRequestError(f"maps must be at least {size}x{size}: {a.shape}, {b.shape}")
    pa, pb = _pool(a, size).ravel(), _pool(b, size).ravel()
    if np.ptp(pa) == 0 or np.ptp(pb) == 0:
        return math.nan
    rho = spearmanr(pa, pb).statistic
    return float(rho)

"""The audit runner: explain every image, score every metric, keep the rows in SQLite.

Per chunk of images: one forward for the predictions, one engine call for
every method's maps of the top-k classes and the true classes, then every
perturbed image of every metric (explanation maps, deletion and insertion
curves, ROAD imputations, fidelity masks) scored in large batches. Rows go to
``DIR/results.sqlite`` (see :mod:`camserve.audit.results`); the summary and
the report are derived from them.
"""

from __future__ import annotations

import math
import platform
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm import tqdm

from camserve import __version__
from camserve.audit import metrics as M
from camserve.audit.datasets import Dataset, Item, load_image, match_categories
from camserve.audit.results import SCHEMA_VERSION, ImageRow, ResultRow, ResultStore
from camserve.audit.scorer import Explained, Scorer
from camserve.errors import CamserveError, InvalidRequestError, UnknownNameError

__all__ = ["METRICS", "AuditSettings", "Prepared", "prepare_batch", "run_audit"]

METRICS: tuple[str, ...] = (
    "localization",
    "pointing_game",
    "confidence",
    "deletion",
    "insertion",
    "road",
    "conservation",
    "sensitivity",
    "alpha",
    "fidelity",
    "contrastivity",
    "rank_correlation",
)
"""Metric groups an audit can compute (``rank_correlation`` also runs occlusion, by default
with 001's 35 px mask and a 16 px stride scaled from 224 px to the input; ``alpha`` applies
when ``gradcampp`` is among the methods; ``sensitivity`` applies to the methods of
:data:`~camserve.audit.scorer.SENSITIVITY_METHODS`, in-process only)."""

DEFAULT_METRICS = tuple(m for m in METRICS
                        if m not in ("road", "rank_correlation", "sensitivity"))
"""The default: ROAD (sparse solves), rank correlation (occlusion) and sensitivity (one
re-run of the network after the layer per channel and image) cost the most."""


@dataclass(frozen=True)
class AuditSettings:
    """What an audit computes; recorded with the results (a rerun must match).

    Attributes:
        methods: method ids explained and scored.
        metrics: metric groups (:data:`METRICS`).
        options: engine options per method (``{"ablationcam": {"form": "sum"}}``).
        top_k: predicted classes explained per image (top-5 localization and
            pointing game use 5).
        chunk_size: images per chunk (a transaction, and one engine call).
        threshold: weak-localization threshold, fraction of the max (003: 0.15).
        pointing_threshold: rejection threshold of the top-5 pointing game (003: 0.5).
        steps: deletion and insertion steps.
        road_percentiles: ROAD removal percentiles.
        road_noise: std of ROAD's imputation noise, in pixel units of ``[0, 1]``.
        percentile: binarisation percentile of fidelity and contrastivity (003: 1 or 10).
        min_score: relative performance counts images scored above this (002: 0.5).
        score_batch: perturbed images per scorer call.
    """

    methods: tuple[str, ...] = ("gradcam", "gradcam_pos", "gradcampp", "xgradcam")
    metrics: tuple[str, ...] = DEFAULT_METRICS
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    top_k: int = 5
    chunk_size: int = 16
    threshold: float = 0.15
    pointing_threshold: float = 0.5
    steps: int = 16
    road_percentiles: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    road_noise: float = 0.01
    percentile: float = 10.0
    min_score: float = 0.5
    score_batch: int = 64

    def check(self) -> None:
        """Raises :class:`UnknownNameError` / :class:`InvalidRequestError` on bad values."""
        from camserve.engine import list_methods

        if not self.methods:
            raise InvalidRequestError("at least one method is needed")
        known = list_methods()
        for m in self.methods:
            if m not in known:
                raise UnknownNameError("method", m, known)
        for g in self.metrics:
            if g not in METRICS:
                raise UnknownNameError("metric", g, METRICS)
        for name in ("top_k", "chunk_size", "steps", "score_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise InvalidRequestError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass
class Prepared:
    """One chunk's images at the model's input size and their truths in class ids."""

    keys: list[str]
    pixels: NDArray[np.float32]  # (N, 3, H, W) in [0, 1]
    truths: list[dict[int, list[tuple[float, float, float, float]]]]
    labels: list[set[int]]
    bad: list[ImageRow]


def prepare_batch(items: Sequence[Item], size: tuple[int, int],
                  category_ids: dict[str, int]) -> Prepared:
    """Decodes and resizes images (bilinear) to ``size``; boxes are scaled alike.

    An image that cannot be decoded becomes a ``bad`` row, never an exception.
    """
    keys, pix, truths, labels, bad = [], [], [], [], []
    h, w = size
    for item in items:
        try:
            img = load_image(item)
        except CamserveError as exc:
            bad.append(ImageRow(item.key, "bad", str(exc)))
            continue
        ih, iw = img.shape[:2]
        if (ih, iw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
        sx, sy = w / iw, h / ih
        boxes: dict[int, list[tuple[float, float, float, float]]] = {}
        present: set[int] = set()
        for t in item.truths:
            cid = category_ids.get(t.category)
            if cid is None:
                continue
            present.add(cid)
            if t.box is not None:
                x0, y0, x1, y1 = t.box
                boxes.setdefault(cid, []).append(
                    (x0 * sx, y0 * sy, (x1 + 1) * sx - 1, (y1 + 1) * sy - 1)
                )
        keys.append(item.key)
        pix.append(img.astype(np.float32).transpose(2, 0, 1) / 255.0)
        truths.append(boxes)
        labels.append(present)
    arr = np.stack(pix) if pix else np.zeros((0, 3, h, w), np.float32)
    return Prepared(keys, arr, truths, labels, bad)


def _targets(probs: NDArray[np.float32], labels: list[set[int]], top_k: int) -> NDArray[np.int64]:
    """Per image the top-k classes, then true classes outside them, padded with the next ranks."""
    n, c = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")
    k = min(c, max([top_k] + [top_k + len(lab - set(order[i, :top_k].tolist()))
                              for i, lab in enumerate(labels)]))
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        ids = order[i, :top_k].tolist()
        ids += sorted(labels[i] - set(ids))
        ids += [j for j in order[i].tolist() if j not in ids]
        out[i] = ids[:k]
    return out


Images = NDArray[np.floating[Any]]


class _Batcher:
    """Perturbed images to score: made lazily, scored ``batch`` at a time, in order.

    Each part is a thunk making its images, so at most one batch of perturbed
    images (plus the part being made) is in memory at once, whatever the chunk.
    """

    def __init__(self, batch: int = 64) -> None:
        self.parts: list[tuple[Callable[[], Images], slice]] = []
        self.n = 0
        self.batch = batch

    def add(self, make: Callable[[], Images], count: int, keep: slice = slice(None)) -> slice:
        self.parts.append((make, keep))
        s = slice(self.n, self.n + count)
        self.n += count
        return s

    def run(self, scorer: Scorer) -> NDArray[np.float32]:
        out: list[NDArray[np.float32]] = []
        buf: list[NDArray[np.float32]] = []
        held = 0
        for make, keep in self.parts:
            imgs = np.asarray(make()[keep], dtype=np.float32)
            buf.append(imgs)
            held += imgs.shape[0]
            if held >= self.batch:
                out.append(scorer.predict(np.concatenate(buf)))
                buf, held = [], 0
        if buf:
            out.append(scorer.predict(np.concatenate(buf)))
        if not out:
            return np.zeros((0, len(scorer.labels)), np.float32)
        scored = np.concatenate(out)
        if scored.shape[0] != self.n:
            raise AssertionError(f"scored {scored.shape[0]} perturbed images, expected {self.n}")
        return scored


def _seed(key: str) -> int:
    """ROAD's noise seed: per image, the same for every method (common random numbers)."""
    return zlib.crc32(key.encode())


def score_chunk(scorer: Scorer, prep: Prepared, s: AuditSettings) -> tuple[list[ImageRow],
                                                                          list[ResultRow]]:
    """Every metric of one chunk: its image rows and result rows."""
    n = len(prep.keys)
    rows: list[ResultRow] = []
    if n == 0:
        return prep.bad, rows
    g = set(s.metrics)
    probs = scorer.predict(prep.pixels)
    ids = _targets(probs, prep.labels, s.top_k)
    methods = list(s.methods)
    options = dict(s.options)
    if "rank_correlation" in g and "occlusion" not in methods:
        methods.append("occlusion")
        # 001 suggests a 35 px mask on 224 px images; scale it (and a 16 px stride) to ours.
        side = min(scorer.input_size)
        options.setdefault("occlusion", {"mask": max(3, round(35 * side / 224)),
                                         "stride": max(1, round(16 * side / 224))})
    alpha = "alpha" in g and "gradcampp" in s.methods  # Grad-CAM++'s alphas, when it is audited
    # asked only when wanted, so scorers written before the sensitivity group still fit
    extra = {"sensitivity": True} if "sensitivity" in g else {}
    exp: Explained = scorer.explain(prep.pixels, methods, ids, options, alpha, **extra)
    top1 = ids[:, 0]
    y = probs[np.arange(n), top1]
    batch = _Batcher(s.score_batch)
    pending: list[tuple[str, str, int, str, Callable[[NDArray[np.float32]], float], slice]] = []
    k5 = min(5, s.top_k, ids.shape[1])

    def later(key: str, method: str, target: int, metric: str, make: Callable[[], Images],
              count: int, fn: Callable[[NDArray[np.float32]], float],
              keep: slice = slice(None)) -> None:
        pending.append((key, method, target, metric, fn, batch.add(make, count, keep)))

    for i, key in enumerate(prep.keys):
        img = prep.pixels[i]
        c0 = int(top1[i])

        def add(method: str, target: int, metric: str, value: float, _key: str = key) -> None:
            rows.append(ResultRow(_key, method, int(target), metric, float(value)))

        correct_before = float(c0 in prep.labels[i]) if prep.labels[i] else 1.0
        for m in s.methods:
            maps = exp.maps[m][i]  # (K, H, W)
            if "localization" in g and prep.truths[i]:
                boxes = [M.weak_localization_box(maps[j], s.threshold) for j in range(k5)]
                add(m, c0, "localization_error",
                    M.localization_error(ids[i, :k5].tolist(), boxes, prep.truths[i], 1))
                add(m, c0, "localization_error_top5",
                    M.localization_error(ids[i, :k5].tolist(), boxes, prep.truths[i], k5))
            if "pointing_game" in g and prep.truths[i]:
                row = {int(c): j for j, c in enumerate(ids[i].tolist())}
                for c, bxs in prep.truths[i].items():
                    add(m, c, "pointing_game", float(M.pointing_hit(maps[row[c]], bxs)))
                # Normalised maps all peak at 1: rejection compares the raw peaks,
                # each as a share of the largest of the five (003 sec. 4).
                mx = _relative_maxima(exp.peaks[m][i, :k5])
                present = [int(c) in prep.labels[i] for c in ids[i, :k5]]
                on = [int(c) in prep.truths[i] and M.pointing_hit(maps[j], prep.truths[i][int(c)])
                      for j, c in enumerate(ids[i, :k5])]
                for j in range(k5):
                    pc = M.pointing_game_top5([mx[j]], [present[j]], [on[j]],
                                              s.pointing_threshold)
                    add(m, int(ids[i, j]), "pointing_top5_correct", pc.accuracy)
                    if present[j]:
                        add(m, int(ids[i, j]), "pointing_top5_hit", pc.recall)
            if "conservation" in g and m in exp.sums:
                add(m, c0, "conservation_residual",
                    M.conservation_residual(float(exp.sums[m][i, 0]), float(exp.scores[i, 0])))
            if "sensitivity" in g and m in exp.contributions and exp.drops is not None:
                add(m, c0, "sensitivity_residual",
                    M.sensitivity_residual(exp.contributions[m][i], exp.drops[i],
                                           float(exp.scores[i, 0])))
            if "alpha" in g and m == "gradcampp" and exp.stats:
                for name, v in exp.stats[i].items():
                    add(m, c0, name, v)
            if "contrastivity" in g and ids.shape[1] > 1:
                negs = [M.binarize(maps[j], s.percentile) for j in range(1, k5)]
                if negs:
                    add(m, c0, "contrastivity",
                        M.contrastivity(M.binarize(maps[0], s.percentile), negs))
            if "rank_correlation" in g and m != "occlusion":
                add(m, c0, "rank_correlation",
                    M.rank_correlation(maps[0], exp.maps["occlusion"][i, 0]))
            # ---- perturbation metrics: images now, probabilities after one batched pass
            if "confidence" in g:
                later(key, m, c0, "explanation_score",
                      partial(_explanation_image, img, maps[0]), 1,
                      partial(_first_score, c=c0))
                add(m, c0, "score", float(y[i]))
            # The deletion curve starts, the insertion curve ends, at the image: its score is known.
            if "deletion" in g:
                later(key, m, c0, "deletion_auc",
                      partial(M.deletion_images, img, maps[0], s.steps), s.steps,
                      partial(_curve_auc, c=c0, first=float(y[i])), slice(1, None))
            if "insertion" in g:
                later(key, m, c0, "insertion_auc",
                      partial(M.insertion_images, img, maps[0], s.steps), s.steps,
                      partial(_curve_auc, c=c0, last=float(y[i])), slice(None, -1))
            if "road" in g:
                half = len(s.road_percentiles)
                later(key, m, c0, "road",
                      partial(_road_images, img, maps[0], s.road_percentiles, s.road_noise,
                              _seed(key)), 2 * half,
                      partial(_road, c=c0, original=float(y[i]), half=half))
            if "fidelity" in g:
                later(key, m, c0, "correct_after", partial(_masked_image, img, maps[0],
                                                           s.percentile), 1,
                      partial(_still_right, c=c0, labels=frozenset(prep.labels[i])))
                add(m, c0, "correct_before", correct_before)
    scored = batch.run(scorer)
    for key, method, target, metric, fn, sl in pending:
        rows.append(ResultRow(key, method, target, metric, fn(scored[sl])))
    images = [
        ImageRow(key, "ok", None, int(top1[i]), float(y[i]), tuple(sorted(prep.labels[i])))
        for i, key in enumerate(prep.keys)
    ]
    return images + prep.bad, rows


def _explanation_image(img: Images, map2d: Images) -> Images:
    return M.explanation_map(img, map2d)[None]


def _road_images(img: Images, map2d: Images, percentiles: tuple[float, ...], noise: float,
                 seed: int) -> Images:
    morf, lerf = M.road_images(img, map2d, percentiles, noise, seed)
    return np.concatenate([morf, lerf])


def _masked_image(img: Images, map2d: Images, percentile: float) -> Images:
    """The image with the binarised map's pixels set to 0 (black), for fidelity (003)."""
    return (img * ~M.binarize(map2d, percentile)[None])[None]


def _first_score(p: NDArray[np.float32], c: int) -> float:
    return float(p[0, c])


def _curve_auc(p: NDArray[np.float32], c: int, first: float | None = None,
               last: float | None = None) -> float:
    curve = [float(v) for v in p[:, c]]
    return M.auc(([first] if first is not None else []) + curve
                 + ([last] if last is not None else []))


def _road(p: NDArray[np.float32], c: int, original: float, half: int) -> float:
    return M.road_score(original, p[:half, c], p[half:, c])


def _still_right(p: NDArray[np.float32], c: int, labels: frozenset[int]) -> float:
    """1 when the masked image is still classified right (a true class, else the original)."""
    pred = int(np.argmax(p[0]))
    return float(pred in labels) if labels else float(pred == c)


def _relative_maxima(peaks: NDArray[np.float32]) -> NDArray[np.float64]:
    """Each raw map's maximum as a share of the largest among the top-5 (for rejection)."""
    s = np.maximum(np.asarray(peaks, dtype=np.float64), 0.0)
    top = float(s.max()) if s.size else 0.0
    return s / top if top > 0 else np.zeros_like(s)


def versions() -> dict[str, str]:
    """Versions the results depend on."""
    import scipy
    import torch

    return {"camserve": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "python": platform.python_version()}


def run_audit(
    scorer: Scorer,
    dataset: Dataset,
    out: str | Path,
    settings: AuditSettings,
    mapping: dict[str, str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    report: bool = True,
    model_name: str | None = None,
    cases: int = 3,
) -> dict[str, Any]:
    """Scores ``dataset`` into ``out/results.sqlite``; writes ``summary.json`` and ``report.html``.

    Resumable: chunks already in the database are skipped.

    Args:
        scorer: the audited model.
        dataset: from :func:`~camserve.audit.datasets.open_dataset`.
        out: output folder (created).
        settings: what to compute.
        mapping: data set category -> model label, for names that differ.
        limit: score only the first ``limit`` images.
        progress: show a tqdm progress bar (with ETA) on stderr.
        report: also write ``out/report.html``.
        model_name: the model's name in the report.
        cases: best and worst images per method drawn in the report.

    Returns:
        The summary (as written to ``summary.json``).

    Raises:
        InvalidRequestError: bad settings, or an output folder holding
            results of another model, data set or settings.
    """
    from camserve.audit.report import write_report
    from camserve.audit.summary import summarize, write_summary

    settings.check()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    cat_ids, unmatched = match_categories(dataset.categories, scorer.labels, mapping)
    items = list(dataset.items[:limit] if limit is not None else dataset.items)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "model_digest": scorer.digest,
        "settings": asdict(settings),
        "dataset": {"name": dataset.name, "format": dataset.format},
        "versions": versions(),
        "layer": scorer.layer,
        "labels": list(scorer.labels),
        "unmatched_categories": unmatched,
    }
    store = ResultStore(folder / "results.sqlite", meta)
    try:
        done = store.done_chunks()
        cs = settings.chunk_size
        chunks = [c for c in range(math.ceil(len(items) / cs)) if c not in done]
        todo = sum(len(items[c * cs:(c + 1) * cs]) for c in chunks)
        with tqdm(total=todo, unit="img", desc="audit", disable=not progress) as bar:
            for c in chunks:
                part = items[c * cs:(c + 1) * cs]
                prep = prepare_batch(part, scorer.input_size, cat_ids)
                images, rows = score_chunk(scorer, prep, settings)
                store.write_chunk(c, images, rows)
                bar.update(len(part))
        summary = summarize(store)
        write_summary(summary, folder / "summary.json")
        if report:
            write_report(folder / "report.html", summary, store, scorer, dataset,
                         model_name or scorer.layer, cases, mapping)
    finally:
        store.close()
    return summary

"""``summary.json``: each metric over the data set, per method, with the images counted."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from camserve.audit import metrics as M
from camserve.audit.results import ResultRow, ResultStore

__all__ = ["MEAN_METRICS", "per_image", "summarize", "write_summary"]

MEAN_METRICS: dict[str, str] = {
    "pointing_game": "pointing_game",
    "localization_error": "localization_error",
    "localization_error_top5": "localization_error_top5",
    "deletion_auc": "deletion_auc",
    "insertion_auc": "insertion_auc",
    "road": "road",
    "conservation_residual": "conservation_residual",
    "sensitivity_residual": "sensitivity_residual",
    "contrastivity": "contrastivity",
    "rank_correlation": "rank_correlation",
}
"""Summary key -> row metric, for metrics whose data set value is the mean over rows."""


def _stat(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not v.size:
        return {"value": math.nan, "count": 0}
    return {"value": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "count": int(v.size)}


def per_image(rows: list[ResultRow], metric: str) -> dict[str, dict[str, float]]:
    """method -> image key -> value of ``metric`` (the top-1 row, or the mean over targets)."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.metric == metric:
            acc[r.method][r.key].append(r.value)
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in acc.items()}


def summarize(store: ResultStore) -> dict[str, Any]:
    """The data set's value of every metric, per method, from the stored rows."""
    meta = store.meta()
    images = store.images()
    rows = store.rows()
    methods: list[str] = list(meta["settings"]["methods"])
    by: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    for r in rows:
        by[(r.method, r.metric)].append(r)
    top1 = {i.key: i.top1 for i in images if i.status == "ok"}
    truths = {i.key: set(i.truths) for i in images if i.status == "ok"}
    out: dict[str, Any] = {}
    for m in methods:
        res: dict[str, Any] = {}
        for key, metric in MEAN_METRICS.items():
            vals = [r.value for r in by[(m, metric)]]
            if vals:
                res[key] = _stat(vals)
        corr = [r.value for r in by[(m, "pointing_top5_correct")]]
        if corr:
            hit = [r.value for r in by[(m, "pointing_top5_hit")]]
            res["pointing_game_top5"] = {**_stat(corr), "recall": _stat(hit)["value"]}
        y = {r.key: r.value for r in by[(m, "score")]}
        o = {r.key: r.value for r in by[(m, "explanation_score")]}
        if o:
            keys = sorted(o)
            res["average_drop"] = {"value": M.average_drop([y[k] for k in keys],
                                                           [o[k] for k in keys]),
                                   "count": len(keys)}
            res["increase_in_confidence"] = {
                "value": M.increase_in_confidence([y[k] for k in keys], [o[k] for k in keys]),
                "count": len(keys)}
        before = {r.key: r.value for r in by[(m, "correct_before")]}
        after = {r.key: r.value for r in by[(m, "correct_after")]}
        if after:
            keys = sorted(after)
            res["fidelity"] = {"value": M.fidelity([before[k] for k in keys],
                                                   [after[k] for k in keys]),
                               "count": len(keys)}
        alpha_rows: dict[str, dict[str, float]] = defaultdict(dict)
        for r in rows:
            if r.method == m and r.metric.startswith(("alpha_", "term_", "tanh_")):
                alpha_rows[r.key][r.metric] = r.value
        if alpha_rows:
            res["alpha"] = M.alpha_summary(list(alpha_rows.values()))
        out[m] = res
    rel: dict[str, Any] = {}
    scores = {m: {r.key: r.value for r in by[(m, "explanation_score")]} for m in methods}
    ys = {r.key: r.value for r in by[(methods[0], "score")]}
    right = [k for k in sorted(ys) if not truths.get(k) or top1.get(k) in truths[k]]
    for a in methods:
        for b in methods:
            if a == b or not scores[a] or not scores[b]:
                continue
            keys = [k for k in right if k in scores[a] and k in scores[b]]
            rel[f"{a} vs {b}"] = M.relative_performance(
                [scores[a][k] for k in keys], [scores[b][k] for k in keys],
                [ys[k] for k in keys], float(meta["settings"]["min_score"]))
    bad = [{"image": i.key, "error": i.error} for i in images if i.status != "ok"]
    return {
        "schema_version": meta["schema_version"],
        "model": {"digest": meta["model_digest"], "layer": meta.get("layer")},
        "dataset": meta["dataset"],
        "images": {"scored": len(top1), "bad": len(bad), "bad_images": bad},
        "settings": meta["settings"],
        "versions": meta["versions"],
        "unmatched_categories": meta.get("unmatched_categories", []),
        "methods": out,
        "relative_performance": rel,
    }


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_summary(summary: Mapping[str, Any], path: str | Path) -> None:
    """Writes the summary as JSON (NaN becomes null, so any JSON reader takes it)."""
    Path(path).write_text(json.dumps(_clean(summary), indent=2, sort_keys=False) + "\n")

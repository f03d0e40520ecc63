"""``report.html``: a self-contained page people can read (Jinja2 template, inlined figures).

Figures are drawn with matplotlib's object API (no pyplot state) and inlined
as base64 PNG; the page loads nothing from the network.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from numpy.typing import NDArray

from camserve.audit.datasets import Dataset
from camserve.audit.results import ResultStore
from camserve.audit.scorer import Scorer
from camserve.audit.summary import per_image

__all__ = ["write_report"]

# summary key -> (label, better direction)
_LABELS: dict[str, tuple[str, str]] = {
    "pointing_game": ("pointing game", "↑"),
    "pointing_game_top5": ("pointing game, top-5 with rejection", "↑"),
    "localization_error": ("localization error (top-1)", "↓"),
    "localization_error_top5": ("localization error (top-5)", "↓"),
    "average_drop": ("average drop", "↓"),
    "increase_in_confidence": ("increase in confidence", "↑"),
    "deletion_auc": ("deletion AUC", "↓"),
    "insertion_auc": ("insertion AUC", "↑"),
    "road": ("ROAD (LeRF − MoRF)/2", "↑"),
    "fidelity": ("fidelity", "↑"),
    "contrastivity": ("contrastivity", "↑"),
    "rank_correlation": ("Spearman ρ with occlusion", "↑"),
    "conservation_residual": ("conservation residual", "↓"),
    "sensitivity_residual": ("sensitivity residual", "↓"),
}

_BOX_METRICS = ("deletion_auc", "insertion_auc", "road", "contrastivity", "rank_correlation",
                "conservation_residual", "sensitivity_residual")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _boxplots(store_rows: Any, methods: Sequence[str], drops: Mapping[str, Mapping[str, float]]
              ) -> dict[str, str] | None:
    panels: list[tuple[str, list[list[float]]]] = []
    for metric in _BOX_METRICS:
        vals = per_image(store_rows, metric)
        if vals:
            panels.append((metric, [[v for v in vals.get(m, {}).values() if math.isfinite(v)]
                                    for m in methods]))
    if drops:
        panels.insert(0, ("drop per image", [list(drops.get(m, {}).values()) for m in methods]))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for n, (metric, data) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        if any(data):
            ax.boxplot([d if d else [math.nan] for d in data], showfliers=True)
            ax.set_xticks(range(1, len(methods) + 1), list(methods), rotation=30, ha="right",
                          fontsize=8)
        if metric in ("conservation_residual", "sensitivity_residual"):
            ax.set_yscale("log")  # residuals span orders of magnitude across methods
        label, arrow = _LABELS.get(metric, (metric, ""))
        ax.set_title(f"{label} {arrow}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return {"title": "Distributions per image",
            "caption": "Box plots of the per-image values of each metric, per method "
                       "(box: quartiles; whiskers: 1.5 IQR; points: outliers).",
            "png": _png(fig)}


def _relative_boxplots(scores: Mapping[str, Mapping[str, float]], right: Sequence[str],
                       methods: Sequence[str]) -> dict[str, str] | None:
    pairs, data = [], []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            keys = [k for k in right if k in scores.get(a, {}) and k in scores.get(b, {})
                    and scores[a][k] > 0 and scores[b][k] > 0]
            if keys:
                pairs.append(f"{a}\nvs {b}")
                data.append([scores[a][k] / scores[b][k] for k in keys])
    if not data:
        return None
    fig = Figure(figsize=(max(5.0, 1.6 * len(pairs)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(pairs) + 1), pairs, fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("O' / O per image (log)")
    fig.tight_layout()
    return {"title": "Relative performance per image (as in 002 Fig. 6)",
            "caption": "Per image, the post-softmax score of the first method's explanation map "
                       "over the second's; images whose class is right and scored above the "
                       "threshold.", "png": _png(fig)}


def _overlay(img: NDArray[np.float32], m: NDArray[np.float32]) -> NDArray[np.float64]:
    heat = colormaps["jet"](np.clip(m, 0.0, 1.0))[..., :3]
    return np.clip(0.5 * img.transpose(1, 2, 0) + 0.5 * heat, 0.0, 1.0)


def _cases(scorer: Scorer, dataset: Dataset, store: ResultStore, methods: Sequence[str],
           options: Mapping[str, Mapping[str, Any]], count: int,
           mapping: Mapping[str, str] | None) -> list[dict[str, str]]:
    from camserve.audit.datasets import match_categories
    from camserve.audit.runner import prepare_batch

    rows = store.rows()
    ins, dele = per_image(rows, "insertion_auc"), per_image(rows, "deletion_auc")
    drop = _drops(store)
    items = {it.key: it for it in dataset.items}
    images = {i.key: i for i in store.images() if i.status == "ok"}
    cat_ids, _ = match_categories(dataset.categories, scorer.labels, mapping)
    figs = []
    for m in methods:
        if ins.get(m) and dele.get(m):
            score = {k: ins[m][k] - dele[m].get(k, math.nan) for k in ins[m]}
            what = "insertion AUC − deletion AUC"
        elif drop.get(m):
            score = {k: -v for k, v in drop[m].items()}
            what = "− drop"
        else:
            continue
        ranked = sorted((k for k in score if math.isfinite(score[k]) and k in items),
                        key=lambda k: (-score[k], k))
        chosen = [("best", k) for k in ranked[:count]] + [("worst", k) for k in ranked[-count:]]
        if not chosen:
            continue
        prep = prepare_batch([items[k] for _, k in chosen], scorer.input_size, cat_ids)
        ids = np.array([[images[k].top1 or 0] for _, k in chosen], dtype=np.int64)
        exp = scorer.explain(prep.pixels, [m], ids, options)
        fig = Figure(figsize=(2.2 * len(chosen), 2.6))
        for j, (kind, key) in enumerate(chosen):
            ax = fig.add_subplot(1, len(chosen), j + 1)
            ax.imshow(_overlay(prep.pixels[j], exp.maps[m][j, 0]))
            label = scorer.labels[int(ids[j, 0])]
            ax.set_title(f"{kind}: {score[key]:.3f}\n{label}", fontsize=8,
                         color="#1a7f37" if kind == "best" else "#b42318")
            ax.set_xlabel(Path(key).name, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        figs.append({"title": f"Best and worst cases: {m}",
                     "caption": f"Ranked by {what} of the top-1 class; overlays of the "
                                "normalised map on the image.", "png": _png(fig)})
    return figs


def _drops(store: ResultStore) -> dict[str, dict[str, float]]:
    rows = store.rows()
    y = per_image(rows, "score")
    o = per_image(rows, "explanation_score")
    return {m: {k: max(0.0, y[m][k] - v) / y[m][k] for k, v in o[m].items()
                if y.get(m, {}).get(k, 0.0) > 0} for m in o}


def write_report(
    path: str | Path,
    summary: Mapping[str, Any],
    store: ResultStore,
    scorer: Scorer | None = None,
    dataset: Dataset | None = None,
    model_name: str = "model",
    cases: int = 3,
    mapping: Mapping[str, str] | None = None,
) -> Path:
    """Writes the HTML report of an audit.

    Args:
        path: the ``report.html`` to write.
        summary: from :func:`~camserve.audit.summary.summarize`.
        store: the audit's results.
        scorer, dataset: when given, the best and worst ``cases`` images per
            method are explained again and drawn as overlay grids.
        model_name: shown in the title.
        cases: best and worst images shown per method.
        mapping: the audit's category mapping (to read the cases' truths alike).

    Returns:
        The path written.
    """
    settings = summary["settings"]
    methods: list[str] = list(settings["methods"])
    rows = store.rows()
    drops = _drops(store)
    tables = []
    for m in methods:
        res = summary["methods"].get(m, {})
        lines = []
        for key, (label, arrow) in _LABELS.items():
            if key in res:
                v = res[key]
                value = _fmt(v.get("value"))
                if key == "pointing_game_top5":
                    value += f" (recall {_fmt(v.get('recall'))})"
                lines.append({"label": label, "arrow": arrow, "value": value,
                              "count": _fmt(v.get("count"))})
        tables.append((m, lines))
    relative = [{"pair": pair, "rp": _fmt(v["relative_performance"]), "mean": _fmt(v["log_mean"]),
                 "std": _fmt(v["log_std"]), "count": _fmt(int(v["count"]))}
                for pair, v in summary.get("relative_performance", {}).items()]
    figures = []
    box = _boxplots(rows, methods, drops)
    if box:
        figures.append(box)
    images = store.images()
    right = [i.key for i in images if i.status == "ok" and (not i.truths or i.top1 in i.truths)
             and (i.score or 0.0) > float(settings["min_score"])]
    rel = _relative_boxplots(per_image(rows, "explanation_score"), right, methods)
    if rel:
        figures.append(rel)
    if scorer is not None and dataset is not None and cases > 0:
        figures.extend(_cases(scorer, dataset, store, methods, settings["options"], cases,
                              mapping))
    alpha = summary["methods"].get("gradcampp", {}).get("alpha")
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("camserve.audit", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    html = env.get_template("report.html.j2").render(
        model_name=model_name,
        dataset=summary["dataset"],
        layer=summary["model"]["layer"],
        digest=summary["model"]["digest"],
        images=summary["images"],
        tables=tables,
        relative=relative,
        settings=settings,
        figures=figures,
        alpha=[(k, _fmt(v)) for k, v in alpha.items()] if alpha else [],
        bad=summary["images"]["bad_images"],
        unmatched=summary.get("unmatched_categories", []),
        settings_rows=[(k, v) for k, v in settings.items()],
        versions=list(summary.get("versions", {}).items()),
    )
    out = Path(path)
    out.write_text(html)
    return out

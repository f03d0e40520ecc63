"""``camserve audit DATASET --model M --methods ... --out DIR``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from camserve.errors import CamserveError, InvalidRequestError, UnknownNameError

__all__ = ["register"]

_LISTS = ("methods", "metrics", "road_percentiles")


def _config(path: str | None) -> dict[str, Any]:
    """A YAML or JSON config file: ``AuditSettings`` fields, plus ``layer`` and ``mapping``."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequestError(f"config file {path!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError(f"config file {path!r} must hold a mapping of settings")
    known = {f.name for f in fields(_settings_cls())} | {"layer", "mapping"}
    for key in data:
        if key not in known:
            raise UnknownNameError("config key", key, known)
    return data


def _settings_cls() -> Any:
    from camserve.audit.runner import AuditSettings

    return AuditSettings


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _audit(args: argparse.Namespace) -> int:
    from camserve.audit.datasets import open_dataset, read_mapping
    from camserve.audit.runner import run_audit
    from camserve.audit.scorer import load_scorer

    try:
        conf = _config(args.config)
        for flag in ("methods", "metrics"):
            if getattr(args, flag):
                conf[flag] = _split(getattr(args, flag))
        for flag in ("top_k", "chunk_size", "threshold", "steps", "percentile"):
            if getattr(args, flag) is not None:
                conf[flag] = getattr(args, flag)
        if args.options:
            conf["options"] = yaml.safe_load(args.options)
        for key in _LISTS:
            if key in conf:
                conf[key] = tuple(conf[key])
        layer = args.layer or conf.pop("layer", None)
        mapping_file = args.mapping or conf.pop("mapping", None)
        settings = _settings_cls()(**conf)
        mapping = read_mapping(mapping_file) if mapping_file else None
        dataset = open_dataset(args.dataset)
        if args.remote:
            from camserve.audit.remote import RemoteScorer

            if layer:
                raise InvalidRequestError("--layer applies to in-process audits; a remote "
                                          "audit explains the served model's layer")
            remote = RemoteScorer(args.remote, args.model, token=args.token,
                                  concurrency=args.concurrency)
            try:
                summary = run_audit(remote, dataset, args.out, settings, mapping=mapping,
                                    limit=args.limit, progress=not args.no_progress,
                                    report=not args.no_report, model_name=args.model)
            finally:
                remote.close()
        else:
            scorer = load_scorer(args.model, args.model_store, layer)
            summary = run_audit(scorer, dataset, args.out, settings, mapping=mapping,
                                limit=args.limit, progress=not args.no_progress,
                                report=not args.no_report, model_name=Path(args.model).stem)
    except (CamserveError, TypeError) as exc:
        print(f"[camserve] audit: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"[camserve] audit of {args.model}: {summary['images']['scored']} images scored, "
          f"{summary['images']['bad']} skipped")
    for name in ("results.sqlite", "summary.json", "report.html"):
        if (out / name).exists():
            print(f"  {out / name}")
    return 0


def register(sub: Any) -> None:
    """Adds ``audit`` to the ``camserve`` subcommands."""
    p: argparse.ArgumentParser = sub.add_parser(
        "audit",
        help="score a classifier's explanations on a data set (summary, SQLite, HTML report)",
        description="Explain every image of DATASET with each method and score the maps: "
        "weak localization, pointing game, average drop / increase in confidence, relative "
        "performance, deletion / insertion, ROAD, conservation, sensitivity, Grad-CAM++ "
        "alphas, fidelity, contrastivity, rank correlation with occlusion. Resumable: rerun to "
        "continue.",
    )
    p.add_argument("dataset", help="COCO instances .json, Pascal VOC folder, or labels .csv")
    p.add_argument("--model", required=True,
                   help="a model of the store, efficientnet_lite0, or a model spec file; "
                   "with --remote, the served model's name")
    p.add_argument("--model-store", default="model_store", help="the model store folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--methods", help="comma-separated method ids (default: gradcam,gradcam_pos,"
                   "gradcampp,xgradcam)")
    p.add_argument("--metrics", help="comma-separated metric groups (default: all but road, "
                   "rank_correlation and sensitivity)")
    p.add_argument("--layer", help="layer to explain (default: the model's)")
    p.add_argument("--options", help='engine options as JSON, e.g. \'{"ablationcam": {"form": '
                   '"sum"}}\'')
    p.add_argument("--config", help="YAML/JSON file of settings (flags override it)")
    p.add_argument("--mapping", help="YAML/JSON file mapping data set categories to labels")
    p.add_argument("--limit", type=int, help="audit only the first N images")
    p.add_argument("--top-k", dest="top_k", type=int, help="predicted classes explained (5)")
    p.add_argument("--chunk-size", dest="chunk_size", type=int, help="images per chunk (16)")
    p.add_argument("--threshold", type=float, help="weak-localization threshold (0.15)")
    p.add_argument("--steps", type=int, help="deletion / insertion steps (16)")
    p.add_argument("--percentile", type=float,
                   help="fidelity / contrastivity binarisation percentile (10)")
    p.add_argument("--remote", metavar="HOST:PORT",
                   help="audit the model served by the camserve gateway there (maps from the "
                   "service, perturbed images re-scored with predict_only requests)")
    p.add_argument("--token", help="bearer token of the gateway (--remote)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="ExplainBatch calls in flight at once (--remote)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_audit)

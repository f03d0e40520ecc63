"""Audit benchmark: images per second of a full camserve audit against the same metrics
computed with pytorch-grad-cam and torchcam, one method and one target at a time.

Workload: the zoo's ``resnet_gap`` (layer2) on the first N held-out single-object
scenes (64 px). Every pipeline computes, per image and method, the top-1 map,
weak localization (003), the pointing game, average drop / increase in
confidence and deletion / insertion AUCs.

- camserve: ``run_audit`` with the gradient methods gradcam, gradcam_pos,
  gradcampp, xgradcam, layercam, hirescam (all maps of a chunk from one engine
  pass; perturbed images scored in large batches), results into SQLite.
- pytorch-grad-cam: its CAM classes (GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM,
  HiResCAM) one image and one target per call, ``DropInConfidence`` and
  ``IncreaseInConfidence``; it has no deletion / insertion, so those use our pure
  functions and one model call per curve.
- torchcam: its extractors (GradCAM, GradCAMpp, XGradCAM, LayerCAM), one image
  per ``update`` of ``ClassificationMetric`` and ``DeletionInsertionMetric``.

Localization and pointing game use camserve's pure functions on every side (the
peers have none). Pipelines alternate over ``--rounds`` rounds; the medians are
reported. Run from the repository root in the bench environment:

    PYTHONPATH=$PWD benchmarks/.venv/bin/python benchmarks/bench_audit.py --json audit.json

``--peers none`` runs camserve alone (any environment).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from camserve.audit import metrics as M
from camserve.audit.datasets import match_categories, open_dataset
from camserve.audit.runner import AuditSettings, Prepared, prepare_batch, run_audit
from camserve.audit.scorer import InProcessScorer, load_zoo_scorer

ROOT = Path(__file__).resolve().parents[1]
OURS = ("gradcam", "gradcam_pos", "gradcampp", "xgradcam", "layercam", "hirescam")
METRICS = ("localization", "pointing_game", "confidence", "deletion", "insertion")
STEPS = 16


def _loc_pointing(m: np.ndarray, c: int, truths: dict[int, list[Any]]) -> None:
    box = M.weak_localization_box(m)
    if c in truths:
        M.localization_correct(box, truths[c])
        M.pointing_hit(m, truths[c])


def camserve_run(scorer: InProcessScorer, n: int, dataset_path: Path) -> float:
    ds = open_dataset(dataset_path)
    out = Path(tempfile.mkdtemp(prefix="bench_audit_"))
    try:
        t0 = time.perf_counter()
        run_audit(scorer, ds, out, AuditSettings(methods=OURS, metrics=METRICS, top_k=1,
                                                  steps=STEPS, chunk_size=16),
                  limit=n, progress=False, report=False)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(model(x), 1)


def pgc_run(scorer: InProcessScorer, prep: Prepared) -> float:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = scorer.model
    layer = dict(model.named_modules())[scorer.layer]
    x = scorer._input(prep.pixels)
    t0 = time.perf_counter()
    top1 = _probs(model, x).argmax(1).tolist()
    for cls in (pgc.GradCAM, pgc.GradCAMPlusPlus, pgc.XGradCAM, pgc.LayerCAM, pgc.HiResCAM):
        with cls(model=model, target_layers=[layer]) as cam:
            for i, c in enumerate(top1):
                xi = x[i : i + 1]
                target = [ClassifierOutputSoftmaxTarget(c)]
                m = cam(input_tensor=xi, targets=target)
                DropInConfidence()(xi, m, target, model)
                IncreaseInConfidence()(xi, m, target, model)
                img = xi[0].numpy()
                for seq in (M.deletion_images(img, m[0], STEPS),
                            M.insertion_images(img, m[0], STEPS)):
                    M.auc(_probs(model, torch.from_numpy(seq).float())[:, c].numpy())
                _loc_pointing(m[0], c, prep.truths[i])
    return time.perf_counter() - t0


def torchcam_run(scorer: InProcessScorer, prep: Prepared) -> float:
    from torchcam import methods as tcm
    from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

    model = scorer.model
    x = scorer._input(prep.pixels)
    softmax = torch.nn.Softmax(dim=-1)
    t0 = time.perf_counter()
    for cls in (tcm.GradCAM, tcm.GradCAMpp, tcm.XGradCAM, tcm.LayerCAM):
        extractor = cls(model, scorer.layer)
        try:
            cm = ClassificationMetric(extractor, softmax)
            di = DeletionInsertionMetric(extractor, softmax, steps=STEPS)
            for i in range(x.shape[0]):
                xi = x[i : i + 1]
                cm.update(xi)
                di.update(xi)
                scores = softmax(model(xi))
                c = int(scores.argmax(1))
                cam = extractor.fuse_cams(extractor(c, scores))
                m = torch.nn.functional.interpolate(cam.unsqueeze(1), xi.shape[-2:],
                                                    mode="bilinear", align_corners=False)
                _loc_pointing(m[0, 0].detach().numpy(), c, prep.truths[i])
            cm.summary()
            di.summary()
        finally:
            extractor.remove_hooks()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description="audit throughput against the peers")
    ap.add_argument("--store", default=str(ROOT / "model_store"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peers", default="pytorch-grad-cam,torchcam",
                    help="comma-separated peers, or none")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peers = [] if args.peers == "none" else args.peers.split(",")
    scorer = load_zoo_scorer(args.store, "resnet_gap")
    dataset_path = Path(args.store) / "datasets" / "single_test" / "instances.json"
    ds = open_dataset(dataset_path)
    cat_ids, _ = match_categories(ds.categories, scorer.labels)
    prep = prepare_batch(ds.items[: args.images], scorer.input_size, cat_ids)
    runs: dict[str, Callable[[], float]] = {
        "camserve": lambda: camserve_run(scorer, args.images, dataset_path)}
    counts = {"camserve": len(OURS)}
    if "pytorch-grad-cam" in peers:
        for p in scorer.model.parameters():
            p.requires_grad_(True)  # the peers take gradients through the parameters
        runs["pytorch-grad-cam"] = lambda: pgc_run(scorer, prep)
        counts["pytorch-grad-cam"] = 5
    if "torchcam" in peers:
        for p in scorer.model.parameters():
            p.requires_grad_(True)
        runs["torchcam"] = lambda: torchcam_run(scorer, prep)
        counts["torchcam"] = 4
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: first calls, allocator, lazy imports
        fn()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(fn())
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = {
            "methods": counts[name],
            "median_s": med,
            "images_per_s": args.images / med,
            "image_methods_per_s": args.images * counts[name] / med,
            "runs_s": ts,
        }
    ours = results["camserve"]["image_methods_per_s"]
    for r in results.values():
        r["camserve_speedup_per_image_method"] = ours / r["image_methods_per_s"]
    out = {
        "meta": {"images": args.images, "rounds": args.rounds, "threads": args.threads,
                 "torch": torch.__version__, "python": platform.python_version(),
                 "model": "resnet_gap (zoo, 64 px)", "metrics": list(METRICS), "steps": STEPS},
        "results": results,
    }
    print(f"{'pipeline':18s} {'methods':>7s} {'median s':>9s} {'img/s':>8s} "
          f"{'img*method/s':>13s} {'camserve x':>10s}")
    for name, r in results.items():
        print(f"{name:18s} {r['methods']:7d} {r['median_s']:9.2f} {r['images_per_s']:8.2f} "
              f"{r['image_methods_per_s']:13.2f} {r['camserve_speedup_per_image_method']:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

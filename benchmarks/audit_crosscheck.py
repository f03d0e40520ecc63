"""Our audit metrics against torchcam's and pytorch-grad-cam's where the definitions coincide.

Runs in the bench environment (benchmarks/setup_env.sh). The same Grad-CAM maps
(torchcam's, on the zoo's ``resnet_gap``) go through each library's metric and
through ours, set up the way the library defines it:

- torchcam ``DeletionInsertionMetric``: baseline 0 in the normalised input, both
  curves from the baseline, ``steps`` dividing H x W (then its ``ceil`` step
  equals ours); ours: :func:`deletion_images`, :func:`insertion_images` with
  ``baseline=0``, :func:`auc`.
- torchcam ``ClassificationMetric``: the map times the normalised input; ours:
  :func:`explanation_map`, :func:`average_drop`, :func:`increase_in_confidence`
  (torchcam divides by ``Y + 1e-7``, we by ``Y``).
- pytorch-grad-cam ``DropInConfidence`` / ``IncreaseInConfidence``: it returns
  ``max(0, Y - O)`` per image, not divided by ``Y``: compared as ``drop * Y``.
- pytorch-grad-cam ROAD (``RemoveMost/LeastRelevantFirst`` with
  ``NoisyLinearImputer(noise=0)``: its noise comes from torch's global
  generator); ours: :func:`road_images` with ``noise=0``, :func:`road_score`.

Usage: benchmarks/.venv/bin/python benchmarks/audit_crosscheck.py --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from camserve.audit import metrics as M
from camserve.audit.datasets import open_dataset
from camserve.audit.scorer import load_zoo_scorer

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(ROOT / "model_store"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from torchcam.methods import GradCAM
    from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

    scorer = load_zoo_scorer(args.store, "resnet_gap")
    model = scorer.model
    for p in model.parameters():
        p.requires_grad_(True)  # torchcam's extractor needs a graph to the layer
    ds = open_dataset(Path(args.store) / "datasets" / "single_test" / "instances.json")
    from camserve.audit.runner import prepare_batch

    prep = prepare_batch(ds.items[: args.images], scorer.input_size, {})
    x = scorer._input(prep.pixels)  # the normalised model input
    softmax = torch.nn.Softmax(dim=-1)

    extractor = GradCAM(model, "layer2")
    scores = softmax(model(x))
    top1 = scores.argmax(1).tolist()
    cams = extractor.fuse_cams(extractor(top1, scores))
    cams = torch.nn.functional.interpolate(cams.unsqueeze(1), x.shape[-2:], mode="bilinear",
                                           align_corners=False).squeeze(1).detach()
    di = DeletionInsertionMetric(extractor, softmax, steps=args.steps, batch_size=64)
    di.update(x)
    cm = ClassificationMetric(extractor, softmax)
    cm.update(x)
    tc_di, tc_cm = di.summary(), cm.summary()
    extractor.remove_hooks()

    xs = x.detach().numpy().astype(np.float64)
    maps = cams.numpy().astype(np.float64)
    y = scores.detach().numpy()[np.arange(len(top1)), top1].astype(np.float64)

    def prob(batch: np.ndarray, c: int) -> np.ndarray:
        with torch.inference_mode():
            out = torch.softmax(model(torch.from_numpy(batch).float()), 1)
        return out[:, c].numpy().astype(np.float64)

    dele, ins, o = [], [], []
    for i, c in enumerate(top1):
        dele.append(M.auc(prob(M.deletion_images(xs[i], maps[i], args.steps, 0.0), c)))
        ins.append(M.auc(prob(M.insertion_images(xs[i], maps[i], args.steps, baseline=0.0), c)))
        o.append(float(prob(M.explanation_map(xs[i], maps[i])[None], c)[0]))
    ours_drop, ours_inc = M.average_drop(y, o), M.increase_in_confidence(y, o)

    targets = [ClassifierOutputSoftmaxTarget(c) for c in top1]
    pgc_drop = DropInConfidence()(x, maps.astype(np.float32), targets, model)
    pgc_inc = IncreaseInConfidence()(x, maps.astype(np.float32), targets, model)
    percentiles = (20, 50, 80)
    morf_p, lerf_p = [], []
    for p in percentiles:
        morf_p.append(PerturbationConfidenceMetric(RemoveMostRelevantFirst(
            p, NoisyLinearImputer(noise=0.0)))(x, maps.astype(np.float32), targets, model))
        lerf_p.append(PerturbationConfidenceMetric(RemoveLeastRelevantFirst(
            p, NoisyLinearImputer(noise=0.0)))(x, maps.astype(np.float32), targets, model))
    pgc_road = ((np.mean(lerf_p, 0) - np.mean(morf_p, 0)) / 2).ravel()
    ours_road = []
    for i, c in enumerate(top1):
        # pytorch-grad-cam builds its masks from the float32 map: so do we.
        m32 = maps[i].astype(np.float32).astype(np.float64)
        morf, lerf = M.road_images(xs[i].astype(np.float32), m32, percentiles, noise=0.0)
        ours_road.append(M.road_score(y[i], prob(morf, c), prob(lerf, c)))
    result = {
        "images": len(top1),
        "torchcam": {
            "deletion_auc": [tc_di["deletion_auc"], float(np.mean(dele))],
            "insertion_auc": [tc_di["insertion_auc"], float(np.mean(ins))],
            "average_drop": [tc_cm["avg_drop"], ours_drop],
            "increase_in_confidence": [tc_cm["conf_increase"], ours_inc],
        },
        "pytorch-grad-cam": {
            "drop_unnormalised": [float(np.mean(pgc_drop)),
                                  float(np.mean(np.maximum(0.0, y - np.array(o))))],
            "increase_in_confidence": [float(np.mean(pgc_inc)), ours_inc],
            "road": [float(np.mean(pgc_road)), float(np.mean(ours_road))],
            "road_per_image_max_abs": float(np.max(np.abs(pgc_road - np.array(ours_road)))),
        },
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

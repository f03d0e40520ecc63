"""The runner end to end on the zoo: summary, SQLite rows, report, resuming, bad images."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from camserve.audit.datasets import open_dataset
from camserve.audit.runner import AuditSettings, run_audit
from camserve.audit.scorer import Explained, InProcessScorer
from camserve.errors import InvalidRequestError, UnknownNameError

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"pointing_game", "pointing_game_top5", "localization_error",
                "localization_error_top5", "average_drop", "increase_in_confidence",
                "deletion_auc", "insertion_auc", "conservation_residual", "fidelity",
                "contrastivity"}


class CountingScorer:
    """A real scorer that counts the images it is asked to predict and explain."""

    def __init__(self, inner: InProcessScorer) -> None:
        self.inner = inner
        self.labels, self.input_size = inner.labels, inner.input_size
        self.digest, self.layer = inner.digest, inner.layer
        self.explained = 0

    def predict(self, pixels: Any) -> Any:
        return self.inner.predict(pixels)

    def explain(self, pixels: Any, methods: Any, class_ids: Any, options: Any,
                alpha_stats: bool = False) -> Explained:
        self.explained += pixels.shape[0]
        return self.inner.explain(pixels, methods, class_ids, options, alpha_stats)


def test_zoo_audit_coco(resnet: InProcessScorer, scenes_coco: Path, tmp_path: Path) -> None:
    settings = AuditSettings(methods=("gradcam", "gradcampp", "counterfactual"), chunk_size=4)
    summary = run_audit(resnet, open_dataset(scenes_coco), tmp_path, settings, progress=False,
                        model_name="resnet_gap")
    assert summary["images"]["scored"] == 12 and summary["images"]["bad"] == 2
    assert {b["image"] for b in summary["images"]["bad_images"]} == {
        "images/broken.png", "images/missing.png"}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["images"] == summary["images"]
    for m in ("gradcam", "gradcampp"):
        res = on_disk["methods"][m]
        assert set(res) >= SUMMARY_KEYS, SUMMARY_KEYS - set(res)
        assert res["deletion_auc"]["count"] == 12 and res["average_drop"]["count"] == 12
        assert res["pointing_game"]["count"] >= 12  # one per true object
    assert "alpha" in on_disk["methods"]["gradcampp"]
    assert "gradcampp vs gradcam" in on_disk["relative_performance"]
    g, cf = on_disk["methods"]["gradcam"], on_disk["methods"]["counterfactual"]
    # The truth is known: Grad-CAM points at the objects of these scenes...
    assert g["pointing_game"]["value"] >= 0.8
    # ... and its evidence matters more than the counterfactual map's.
    assert g["deletion_auc"]["value"] < cf["deletion_auc"]["value"]
    assert g["insertion_auc"]["value"] > cf["insertion_auc"]["value"]
    assert g["average_drop"]["value"] < cf["average_drop"]["value"]
    # One row per image x method x target x metric, with the run's metadata.
    db = sqlite3.connect(tmp_path / "results.sqlite")
    meta = dict(db.execute("SELECT key, value FROM meta"))
    assert json.loads(meta["schema_version"]) == 1
    assert json.loads(meta["model_digest"]).startswith("sha256:")
    assert "torch" in json.loads(meta["versions"])
    n = db.execute("SELECT COUNT(*) FROM results WHERE metric='deletion_auc'").fetchone()[0]
    assert n == 12 * 3
    dup = db.execute("SELECT COUNT(*) FROM (SELECT key, method, target, metric, COUNT(*) c "
                     "FROM results GROUP BY 1, 2, 3, 4 HAVING c > 1)").fetchone()[0]
    assert dup == 0
    db.close()
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "broken.png" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from the network
    assert "Best and worst cases: gradcam" in html


def test_rerun_skips_what_is_scored(resnet: InProcessScorer, scenes_coco: Path,
                                    tmp_path: Path) -> None:
    ds = open_dataset(scenes_coco)
    settings = AuditSettings(methods=("gradcam",), metrics=("pointing_game", "deletion"),
                             chunk_size=5)
    first = CountingScorer(resnet)
    s1 = run_audit(first, ds, tmp_path, settings, limit=10, progress=False, report=False)
    assert first.explained == 9  # one of the ten is the broken image
    again = CountingScorer(resnet)
    s2 = run_audit(again, ds, tmp_path, settings, limit=10, progress=False, report=False)
    assert again.explained == 0 and s2 == s1
    more = CountingScorer(resnet)
    s3 = run_audit(more, ds, tmp_path, settings, progress=False, report=False)
    assert more.explained == 3 and s3["images"]["scored"] == 12
    other = AuditSettings(methods=("gradcampp",), metrics=("pointing_game",), chunk_size=5)
    with pytest.raises(InvalidRequestError, match="another settings"):
        run_audit(resnet, ds, tmp_path, other, progress=False, report=False)


def test_voc_and_csv_with_mapping(resnet: InProcessScorer, scenes_voc: Path, scenes_csv: Path,
                                  tmp_path: Path) -> None:
    settings = AuditSettings(methods=("gradcam",), metrics=("localization", "pointing_game"))
    s = run_audit(resnet, open_dataset(scenes_voc), tmp_path / "voc", settings, progress=False,
                  report=False)
    assert s["methods"]["gradcam"]["pointing_game"]["count"] == 6
    assert s["methods"]["gradcam"]["pointing_game"]["value"] >= 0.8
    ds = open_dataset(scenes_csv)
    mapping = {c: c[5:] for c in ds.categories}
    s = run_audit(resnet, ds, tmp_path / "csv", settings, mapping=mapping, progress=False,
                  report=False)
    # 96 px images resized to the model's 64 px, boxes scaled alike.
    assert s["methods"]["gradcam"]["pointing_game"]["count"] == 6
    assert s["methods"]["gradcam"]["pointing_game"]["value"] >= 0.8
    unmapped = run_audit(resnet, ds, tmp_path / "csv2", settings, progress=False, report=False)
    assert "pointing_game" not in unmapped["methods"]["gradcam"]
    assert len(unmapped["unmatched_categories"]) == len(ds.categories)


def test_bad_settings(resnet: InProcessScorer, scenes_coco: Path, tmp_path: Path) -> None:
    ds = open_dataset(scenes_coco)
    with pytest.raises(UnknownNameError, match="gradcamx"):
        run_audit(resnet, ds, tmp_path, AuditSettings(methods=("gradcamx",)), progress=False)
    with pytest.raises(UnknownNameError, match="metric"):
        run_audit(resnet, ds, tmp_path, AuditSettings(metrics=("accuracy",)), progress=False)
    with pytest.raises(InvalidRequestError, match="chunk_size"):
        run_audit(resnet, ds, tmp_path, AuditSettings(chunk_size=0), progress=False)


def _audit_cmd(zoo_store: Path, dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "camserve.cli", "audit", str(dataset), "--model", "resnet_gap",
            "--model-store", str(zoo_store), "--out", str(out), "--methods", "gradcam,gradcampp",
            "--metrics", "localization,pointing_game,confidence,deletion,insertion,road,alpha",
            "--chunk-size", "2", "--no-report", "--no-progress"]


def _rows(path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT key, method, target, metric, value FROM results "
                          "ORDER BY 1, 2, 3, 4").fetchall()
    finally:
        db.close()


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(zoo_store: Path, scenes_coco: Path,
                                                        tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_audit_cmd(zoo_store, scenes_coco, whole), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen(_audit_cmd(zoo_store, scenes_coco, killed), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_path = killed / "results.sqlite"
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                db = sqlite3.connect(db_path, timeout=0.1)
                done = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
                db.close()
            except sqlite3.OperationalError:
                done = 0
            if done >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the audit ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    partial = _rows(db_path)
    assert 0 < len(partial) < len(_rows(whole / "results.sqlite"))
    subprocess.run(_audit_cmd(zoo_store, scenes_coco, killed), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    a, b = _rows(whole / "results.sqlite"), _rows(db_path)
    assert [r[:4] for r in a] == [r[:4] for r in b]
    np.testing.assert_array_equal(np.array([np.nan if r[4] is None else r[4] for r in a]),
                                  np.array([np.nan if r[4] is None else r[4] for r in b]))
    sa = json.loads((whole / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["methods"] == sb["methods"] and sa["images"] == sb["images"]


def test_rank_correlation_with_occlusion(resnet: InProcessScorer, scenes_voc: Path,
                                         tmp_path: Path) -> None:
    settings = AuditSettings(methods=("gradcam", "counterfactual"), metrics=("rank_correlation",))
    s = run_audit(resnet, open_dataset(scenes_voc), tmp_path, settings, limit=4, progress=False,
                  report=False)
    rho = {m: s["methods"][m]["rank_correlation"] for m in ("gradcam", "counterfactual")}
    assert rho["gradcam"]["count"] == 4
    # Grad-CAM ranks pixels as occlusion does (003 Table 3); the counterfactual map does not.
    assert rho["gradcam"]["value"] > 0.5
    assert rho["counterfactual"]["value"] < rho["gradcam"]["value"]

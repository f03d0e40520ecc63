"""Remote audits: a real gateway on loopback serving the zoo's model, audited through it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from camserve.audit.datasets import open_dataset
from camserve.audit.remote import RemoteScorer
from camserve.audit.runner import AuditSettings, run_audit
from camserve.audit.scorer import InProcessScorer
from camserve.cli import main
from camserve.errors import OverloadedError
from camserve.gateway.inprocess import InProcessBackend
from camserve.gateway.server import BackgroundGateway
from camserve.models import write_spec
from camserve.service import ExplainRequest
from camserve.service.outcomes import ExplainError
from camserve.zoo.store import model_spec, read_manifest
from tests.gateway.conftest import start

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(zoo_store: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[BackgroundGateway]:
    # Spec files of the zoo's models (their weights stay in the store).
    specs = tmp_path_factory.mktemp("specs")
    _, entries = read_manifest(zoo_store)
    for name in ("resnet_gap", "captioner"):
        write_spec(model_spec(zoo_store, entries[name]), specs / f"{name}.toml")
    gw = start(InProcessBackend.load(["resnet_gap", "captioner"], specs), max_batch_delay_ms=2)
    try:
        yield gw
    finally:
        gw.stop()


def test_remote_audit_matches_the_in_process_one(gateway: BackgroundGateway,
                                                 resnet: InProcessScorer, scenes_coco: Path,
                                                 tmp_path: Path) -> None:
    metrics = "localization,pointing_game,confidence,deletion,insertion,conservation"
    code = main(["audit", str(scenes_coco), "--model", "resnet_gap", "--remote", gateway.address,
                 "--out", str(tmp_path / "remote"), "--methods", "gradcam,gradcampp",
                 "--metrics", metrics, "--limit", "7", "--chunk-size", "4", "--no-progress"])
    assert code == 0
    remote = json.loads((tmp_path / "remote" / "summary.json").read_text())
    local = run_audit(resnet, open_dataset(scenes_coco), tmp_path / "local",
                      AuditSettings(methods=("gradcam", "gradcampp"),
                                    metrics=tuple(metrics.split(",")), chunk_size=4),
                      limit=7, progress=False, report=False)
    assert remote["images"]["scored"] == 6 and remote["images"]["bad"] == 1  # broken.png
    assert remote["model"]["digest"].startswith("remote:")
    for m in ("gradcam", "gradcampp"):
        r, loc = remote["methods"][m], local["methods"][m]
        assert set(r) == set(loc)
        # Same inputs (float32 tensors), same maps, same re-scored images: the same numbers.
        for key in set(r):
            assert r[key]["value"] == pytest.approx(loc[key]["value"], abs=1e-5), (m, key)
            assert r[key]["count"] == loc[key]["count"]
    assert (tmp_path / "remote" / "report.html").exists()


def test_remote_audit_refuses_what_it_cannot_audit(gateway: BackgroundGateway,
                                                   scenes_coco: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["audit", str(scenes_coco), "--remote", gateway.address, "--out", str(tmp_path),
            "--no-progress"]
    assert main([*args, "--model", "captioner"]) == 2
    assert "audits need a classifier" in capsys.readouterr().err
    assert main([*args, "--model", "nosuchmodel"]) == 2
    assert "nosuchmodel" in capsys.readouterr().err


def test_items_refused_by_a_full_queue_are_sent_again(zoo_store: Path, resnet: InProcessScorer,
                                                      tmp_path: Path) -> None:
    # A queue of 2 items and one item per engine call: 2 calls of 8 items overflow it
    # at once, and the gateway refuses the rest per item (RESOURCE_EXHAUSTED).
    _, entries = read_manifest(zoo_store)
    write_spec(model_spec(zoo_store, entries["resnet_gap"]), tmp_path / "resnet_gap.toml")
    gw = start(InProcessBackend.load(["resnet_gap"], tmp_path), max_queue_size=2,
               max_batch_size=1)
    try:
        scorer = RemoteScorer(gw.address, "resnet_gap", batch=8, concurrency=2)
        try:
            pixels = np.random.default_rng(0).random((16, 3, 64, 64), dtype=np.float32)
            refused = scorer.client.explain_batch(
                [ExplainRequest("resnet_gap", tensor=scorer._tensor(p), predict_only=True)
                 for p in pixels]
            )
            assert any(isinstance(o, ExplainError) and isinstance(o.error, OverloadedError)
                       for o in refused)  # the gateway does refuse them
            probs = scorer.predict(pixels)
        finally:
            scorer.close()
        top = np.argsort(-probs, axis=1)[:, :5]
        want = resnet.predict(pixels)
        np.testing.assert_array_equal(top, np.argsort(-want, axis=1)[:, :5])
        np.testing.assert_allclose(np.take_along_axis(probs, top, 1),
                                   np.take_along_axis(want, top, 1), atol=1e-5)
    finally:
        gw.stop()

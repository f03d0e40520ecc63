"""Remote audits: a real gateway on loopback serving the zoo's model, audited through it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from camserve.audit.datasets import open_dataset
from camserve.audit.runner import AuditSettings, run_audit
from camserve.audit.scorer import InProcessScorer
from camserve.cli import main
from camserve.gateway.inprocess import InProcessBackend
from camserve.gateway.server import BackgroundGateway
from camserve.models import write_spec
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

"""A user's own model (a factory module and a state dict written here) through a real TorchServe."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch

from camserve.codecs.http import decode_map
from camserve.models import read_spec
from camserve.torchserve.archive import build_archive
from camserve.torchserve.config import ServeConfig
from camserve.torchserve.process import TorchServe

from .conftest import post, scene_png

pytestmark = pytest.mark.slow

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))
"""


def test_a_user_model_spec_is_archived_and_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "pet_nets.py").write_text(NET)
    monkeypatch.syspath_prepend(str(pkg))
    import pet_nets  # type: ignore[import-not-found]

    torch.manual_seed(0)
    torch.save(pet_nets.Net(3).state_dict(), pkg / "pets.pt")
    (pkg / "labels.txt").write_text("cat\ndog\nbird\n")
    (pkg / "pets.toml").write_text(
        textwrap.dedent(
            """\
            name = "pets"
            kind = "classifier"
            layer = "features.1"
            input_size = [3, 32, 32]
            labels_file = "labels.txt"
            factory = "pet_nets:Net"
            weights = "pets.pt"
            factory_kwargs = { classes = 3 }
            """
        )
    )
    store = tmp_path / "store"
    mar = build_archive(read_spec(pkg / "pets.toml"), store)
    assert mar == store / "pets.mar" and mar.is_file()
    # The workers import the user's package like any other dependency of the model.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]))
    server = TorchServe(ServeConfig.free_ports(model_store=store, run_dir=tmp_path / "run"))
    server.start()
    try:
        server.wait_ready(timeout=240)
        image, _ = scene_png(5)
        png = {"Content-Type": "image/png"}
        reply = post(server, "pets", image, "?methods=gradcam,cam&top_k=2", png)
        assert reply.status == 200, reply.body
        res = reply.json()
        assert res["model"] == "pets" and res["layer"] == "features.1"
        assert res["input_size"] == [32, 32] and res["image_size"] == [64, 64]
        assert {p["label"] for p in res["predictions"]} == {"cat", "dog", "bird"}
        assert len(res["explanations"]) == 2
        maps = res["explanations"][0]["maps"]
        assert decode_map(maps["cam"]).shape == (32, 32)
        x0, y0, x1, y1 = maps["gradcam"]["box"]
        assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64
        bad = post(server, "pets", image, "?layer=features.9", png)
        assert bad.status == 400 and "unknown layer 'features.9'" in bad.json()["error"]["message"]
    finally:
        server.stop()

"""TorchServe archives from model specs: handler, shared class and the spec's bundle."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from camserve.models import read_spec
from camserve.torchserve.archive import build_archive, zoo_models, zoo_specs

STORE = Path(__file__).resolve().parents[2] / "model_store"


def test_a_zoo_spec_archives_its_bundle(tmp_path: Path) -> None:
    if not (STORE / "vqa.toml").exists():
        pytest.fail("model_store/ is not built: run `camserve build-models` (scripts/test.sh does)")
    spec = zoo_specs(STORE)["vqa"]
    mar = build_archive(spec, tmp_path)
    assert mar == tmp_path / "vqa.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        assert {"vqa_handler.py", "camserve_base.py", "model.toml", "vqa.pt"} <= names
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        z.extract("model.toml", tmp_path / "x")
        z.extract("vqa.pt", tmp_path / "x")
    assert manifest["model"]["handler"] == "vqa_handler.py"
    bundled = read_spec(tmp_path / "x" / "model.toml")
    assert bundled.weights == tmp_path / "x" / "vqa.pt"
    assert (bundled.labels, bundled.vocab, bundled.layer) == (spec.labels, spec.vocab, spec.layer)
    assert zoo_models(STORE)["vqa"] == {"kind": "vqa", "files": [STORE / "vqa.pt"]}

"""``camserve explain``: figures and a JSON for images, from a zoo name or a spec file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from camserve.cli import main

STORE = Path(__file__).resolve().parents[1] / "model_store"


def store() -> Path:
    if not (STORE / "resnet_gap.toml").exists():
        pytest.fail("model_store/ is not built: run `camserve build-models` (scripts/test.sh does)")
    return STORE


def test_explain_writes_a_figure_per_image_target_and_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [store() / "examples" / "scene_1.png", store() / "examples" / "scene_2.png"]
    code = main(
        [
            "explain",
            *map(str, images),
            "--model",
            "resnet_gap",
            "--model-store",
            str(STORE),
            "--methods",
            "gradcam,gradcampp",
            "--top-k",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "explanations.json").read_text())
    assert report["model"] == "resnet_gap" and len(report["results"]) == 2
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(figures) == 2 * 2 * 2
    for entry in report["results"]:
        assert entry["predictions"][0]["label"] == entry["targets"][0]["label"]
        assert {"forward", "backward", "decode"} <= set(entry["timings"])
        for target in entry["targets"]:
            for method, m in target["maps"].items():
                x0, y0, x1, y1 = m["box"]
                assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64
                assert m["figure"] in figures and method in m["figure"]
    with Image.open(tmp_path / figures[0]) as fig:
        assert fig.format == "PNG" and fig.size[0] > fig.size[1]
    # The scene's objects: the top class is one of them (the zoo's classifier is accurate).
    caption = (store() / "examples" / "scene_1.txt").read_text()
    top = report["results"][0]["predictions"][0]["label"].replace("_", " ")
    assert top in caption
    assert "wrote" in capsys.readouterr().out


def test_explain_reports_bad_images_and_unknown_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    args = ["explain", str(bad), "--model-store", str(store()), "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--model", "resnet_gap"]) == 1
    report = json.loads((tmp_path / "explanations.json").read_text())
    assert report["results"][0]["error"].startswith("InvalidImageError")
    assert main([*args, "--model", "nosuch"]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err

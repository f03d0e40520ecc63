"""EfficientNet-Lite0 (pretrained, real photos) exported through the CLI from its model spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from camserve.engine import Explainer
from camserve.export import OnnxExplainer
from camserve.export.zoo import load_images

efficientnet = pytest.importorskip("camserve.models.efficientnet")
datasets = pytest.importorskip("sklearn.datasets")


@pytest.mark.slow
def test_efficientnet_lite0_exports_and_explains_like_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from camserve.cli import main

    files = []
    for name in ("china.jpg", "flower.jpg"):
        path = tmp_path / name.replace(".jpg", ".png")
        Image.fromarray(datasets.load_sample_image(name)).save(path)
        files.append(path)
    out = tmp_path / "lite0.onnx"
    code = main(["export-onnx", "efficientnet_lite0", "--out", str(out),
                 "--model-store", str(tmp_path), "--images", *map(str, files)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "max abs diff: logits" in text.out
    spec = efficientnet.efficientnet_lite0_spec()
    x = load_images(files, (224, 224), spec.mean, spec.std)
    ox = OnnxExplainer(out)
    assert ox.cam and ox.max_targets is None and ox.layers == (spec.layer,)
    methods = ["gradcam", "gradcampp", "xgradcam", "layercam", "cam"]
    got = ox.explain(x, methods, targets=3)
    ref = Explainer(efficientnet.efficientnet_lite0(), spec.layer).explain(x, methods, targets=3)
    assert torch.equal(got.target_ids, ref.target_ids)
    for m in methods:
        want = ref.map(m)
        diff = float((got.map(m) - want).abs().max())
        assert diff <= 1e-4 * max(1.0, float(want.abs().max())), (m, diff)

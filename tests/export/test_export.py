"""Export round trips: checker, names, dynamic batch, onnxruntime vs torch; clear failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.errors import ExportError, InvalidRequestError, UnknownNameError
from camserve.export import OnnxExplainer, export_onnx
from camserve.export.zoo import TORCH_ONLY, export_zoo
from camserve.zoo.store import load
from tests.export.conftest import Exported

TOL = 1e-4
"""Logits: max abs difference <= TOL * max(1, max |torch logit|)."""


def _run(path: Path, xs: tuple[Tensor, ...], k: int) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {n: x.numpy() for n, x in zip(names, xs, strict=False)}
    fixed_k = sess.get_inputs()[-1].shape[1]  # an int where the graph fixes K, else a name
    width = fixed_k if isinstance(fixed_k, int) else k
    feed["class_ids"] = np.full((xs[0].shape[0], width), -1, dtype=np.int64)
    outs = [o.name for o in sess.get_outputs()]
    got = dict(zip(outs, sess.run(outs, feed), strict=True))
    for name in ("gradients", "target_ids"):
        got[name] = got[name][:, :k]
    return got


@pytest.mark.parametrize("name", ["resnet_gap", "vgg_fc"])
def test_zoo_classifier_round_trip(
    name: str,
    exported: Callable[[str], Exported],
    real_inputs: Callable[[str, int], tuple[Tensor, ...]],
) -> None:
    model, entry, report = exported(name)
    onnx.checker.check_model(str(report.path), full_check=True)
    proto = onnx.load(str(report.path))
    outputs = [o.name for o in proto.graph.output]
    assert outputs[:4] == ["logits", "activations", "gradients", "target_ids"]
    assert ("cam" in outputs) == (name == "resnet_gap")
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch size
    assert all(d <= TOL * 100 for d in report.max_abs_diff.values()), report.max_abs_diff
    for n in (1, 7):  # batch sizes other than the example's 4
        (x,) = real_inputs(name, n)
        got = _run(report.path, (x,), 3)
        with torch.no_grad():
            ref = model(x)
        diff = float(np.abs(got["logits"] - ref.numpy()).max())
        print(f"{name} batch {n}: max abs logit diff {diff:.2e}")
        assert got["logits"].shape == (n, len(entry.labels))
        assert diff <= TOL * max(1.0, float(ref.abs().max()))
        assert got["gradients"].shape[:2] == (n, 3)
        np.testing.assert_array_equal(got["target_ids"], ref.topk(3, dim=1).indices.numpy())


@pytest.mark.slow
def test_vqa_round_trip(
    zoo_store: Path, tmp_path: Path, real_inputs: Callable[[str, int], tuple[Tensor, ...]]
) -> None:
    reports = export_zoo(zoo_store, ["vqa", "captioner"], out=tmp_path)
    assert reports["captioner"] == TORCH_ONLY["captioner"]
    assert not (tmp_path / "captioner.onnx").exists()
    report = reports["vqa"]
    assert not isinstance(report, str)
    assert report.inputs == ("images", "input_1", "class_ids")
    model, entry = load(zoo_store, "vqa")
    x, q = real_inputs("vqa", 3)
    got = _run(report.path, (x, q), 2)
    with torch.no_grad():
        ref = model(x, q)
    assert float(np.abs(got["logits"] - ref.numpy()).max()) <= TOL * max(
        1.0, float(ref.abs().max())
    )
    # questions shorter than the graph's 16 tokens are padded with <pad> (id 0 in metadata)
    short = q[:, : int((q != 0).sum(dim=1).max())]
    assert short.shape[1] < q.shape[1]
    methods = ["gradcam", "gradcampp", "layercam"]
    answers = [[0, 5], [1, 2], [3, 3]]
    res = OnnxExplainer(report.path).explain((x, short), methods, answers, "probability")
    want = Explainer(model, entry.target_layer).explain((x, short), methods, answers, "probability")
    for m in methods:
        diff = float((res.map(m) - want.map(m)).abs().max())
        assert diff <= 1e-5 * max(1.0, float(want.map(m).abs().max())), (m, diff)


class MedianCentred(nn.Module):
    """Each channel centred on its median before the explained conv: ONNX has no aten.median."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        s = s - s.flatten(2).median(dim=2).values[:, :, None, None]
        a = torch.relu(self.conv(s))
        return self.fc(a.mean(dim=(2, 3)))


def test_unexportable_operator_is_named(tmp_path: Path) -> None:
    model = MedianCentred().eval()
    with pytest.raises(ExportError, match=r"operator aten\.median") as info:
        export_onnx(model, torch.randn(2, 3, 8, 8), "conv", tmp_path / "m.onnx", targets=2)
    assert info.value.operator is not None and info.value.operator.startswith("aten.median")


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
    ).eval()


def test_tolerance_is_enforced(tmp_path: Path) -> None:
    model = _tiny()
    x = torch.randn(3, 3, 16, 16) * 100  # large values: float32 rounding differs
    report = export_onnx(model, x, "3", tmp_path / "ok.onnx", targets=2)
    assert report.cam and set(report.max_abs_diff) >= {"logits", "gradients", "cam"}
    assert max(report.max_abs_diff.values()) > 0.0
    with pytest.raises(ExportError, match="differs from torch beyond the tolerance"):
        export_onnx(model, x, "3", tmp_path / "strict.onnx", targets=2, tolerance=0.0)


def test_refuses_training_mode_and_unknown_layers(tmp_path: Path) -> None:
    model = _tiny()
    with pytest.raises(UnknownNameError, match="unknown layer 'nope'"):
        export_onnx(model, torch.randn(1, 3, 8, 8), "nope", tmp_path / "a.onnx")
    with pytest.raises(InvalidRequestError, match="training mode"):
        export_onnx(model.train(), torch.randn(1, 3, 8, 8), "3", tmp_path / "a.onnx")
    with pytest.raises(InvalidRequestError, match=r"must output a float tensor \(N, C, h, w\)"):
        export_onnx(model.eval(), torch.randn(1, 3, 8, 8), "6", tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.slow
def test_cli_export_onnx(
    zoo_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from camserve.cli import main

    out = tmp_path / "resnet_gap.onnx"
    code = main(["export-onnx", "resnet_gap", "--model-store", str(zoo_store), "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "max abs diff: logits" in text.out and out.is_file()
    code = main(["export-onnx", "captioner", "--model-store", str(zoo_store), "--out", str(out)])
    assert code == 1 and "captioner is not exported" in capsys.readouterr().err


def test_a_single_example_image_gives_a_dynamic_batch(tmp_path: Path) -> None:
    """One example image is enough: the graph is not fixed to a batch of 1."""
    model = _tiny()
    torch.manual_seed(1)
    report = export_onnx(model, torch.randn(1, 3, 16, 16), "3", tmp_path / "one.onnx", targets=2)
    proto = onnx.load(str(report.path))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    x = torch.randn(5, 3, 16, 16)
    got = _run(report.path, (x,), 2)
    with torch.no_grad():
        ref = model(x)
    assert got["logits"].shape == (5, 6)
    diff = float(np.abs(got["logits"] - ref.numpy()).max())
    assert diff <= TOL * max(1.0, float(ref.abs().max()))
    np.testing.assert_array_equal(got["target_ids"], ref.topk(2, dim=1).indices.numpy())

"""OnnxExplainer vs the torch engine: same predictions, same maps, same errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.engine.maps import normalize
from camserve.errors import InvalidRequestError, UnknownNameError, UnsupportedMethodError
from camserve.export import GRAPH_METHODS, OnnxExplainer, export_onnx, select_providers
from tests.export.conftest import Exported

MAP_TOL = 1e-5
"""Maps: max abs difference <= MAP_TOL * max(1, max |torch map|) (float32 rounding)."""

CAM_TOL = 1e-5
"""CAM vs Grad-CAM / XGrad-CAM after min-max normalisation (000 sec. 3)."""

TARGETS: list[tuple[str, object, str]] = [
    ("top3-logit", 3, "logit"),
    ("top5-probability", 5, "probability"),
    ("ids-logit", "ids", "logit"),
    ("ids-probability", "ids", "probability"),
]


def _close(got: Tensor, ref: Tensor, tol: float) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    diff = float((got.cpu() - ref.cpu()).abs().max())
    assert diff <= tol * max(1.0, float(ref.abs().max())), diff
    return diff


@pytest.mark.parametrize("name", ["resnet_gap", "vgg_fc"])
@pytest.mark.parametrize("n", [1, 4])
def test_maps_match_the_torch_engine(
    name: str,
    n: int,
    exported: Callable[[str], Exported],
    real_inputs: Callable[[str, int], tuple[Tensor, ...]],
) -> None:
    model, entry, report = exported(name)
    ox = OnnxExplainer(report.path)
    ex = Explainer(model, entry.target_layer)
    (x,) = real_inputs(name, n)
    methods = ox.supported_methods()
    assert set(GRAPH_METHODS) <= set(methods) and ("cam" in methods) == (name == "resnet_gap")
    for label, targets, score in TARGETS:
        tg = [[(3 * i) % 12, (5 * i + 1) % 12] for i in range(n)] if targets == "ids" else targets
        got = ox.explain(x, methods, tg, score)  # type: ignore[arg-type]
        ref = ex.explain(x, methods, tg, score)  # type: ignore[arg-type]
        assert torch.equal(got.target_ids.cpu(), ref.target_ids.cpu())
        assert ref.logits is not None and got.logits is not None
        _close(got.logits, ref.logits, 1e-4)
        _close(got.target_scores, ref.target_scores, 1e-4)
        worst = {m: _close(got.map(m), ref.map(m), MAP_TOL) for m in methods}
        print(f"{name} n={n} {label}: worst map diff {max(worst.values()):.2e}")
        assert got.upsampled("gradcam").shape == (n, got.target_ids.shape[1], 64, 64)
        assert got.timings["forward"] > 0.0


def test_cam_in_the_graph_equals_gradcam_and_xgradcam(
    exported: Callable[[str], Exported],
    real_inputs: Callable[[str, int], tuple[Tensor, ...]],
) -> None:
    model, entry, report = exported("resnet_gap")
    (x,) = real_inputs("resnet_gap", 4)
    got = OnnxExplainer(report.path).explain(x, ["cam"], targets=5)
    ref = Explainer(model, entry.target_layer).explain(x, ["gradcam", "xgradcam"], targets=5)
    cam = normalize(got.map("cam"))
    assert float(cam.amax()) == 1.0  # not blank
    for m in ("gradcam", "xgradcam"):
        diff = float((cam - normalize(ref.map(m))).abs().max())
        print(f"cam vs {m}: {diff:.2e}")
        assert diff <= CAM_TOL


def test_unsupported_methods_are_named(
    exported: Callable[[str], Exported],
    real_inputs: Callable[[str, int], tuple[Tensor, ...]],
) -> None:
    (x,) = real_inputs("vgg_fc", 1)
    ox = OnnxExplainer(exported("vgg_fc")[2].path)
    with pytest.raises(UnsupportedMethodError, match="cannot compute scorecam, guided_gradcam"):
        ox.explain(x, ["gradcam", "scorecam", "guided_gradcam"])
    with pytest.raises(UnsupportedMethodError, match=r"cannot compute cam .*linear head"):
        ox.explain(x, ["cam"])
    with pytest.raises(UnknownNameError, match="unknown method 'gradcan'"):
        ox.explain(x, ["gradcan"])


def test_bad_targets_and_inputs(
    exported: Callable[[str], Exported],
    real_inputs: Callable[[str, int], tuple[Tensor, ...]],
) -> None:
    (x,) = real_inputs("vgg_fc", 2)
    ox = OnnxExplainer(exported("vgg_fc")[2].path)
    assert ox.max_targets == 5 and ox.num_classes == 12  # this graph fixes K (see README)
    for k in (torch.tensor(2), np.int64(2)):  # 0-d integers mean top-k, as in the engine
        res = ox.explain(x, targets=k)
        assert res.logits is not None
        assert torch.equal(res.target_ids, res.logits.topk(2, dim=1).indices)
    with pytest.raises(InvalidRequestError, match="at most 5 targets per image, got 6"):
        ox.explain(x, targets=6)
    with pytest.raises(UnknownNameError, match="unknown class 12"):
        ox.explain(x, targets=[[1], [12]])
    with pytest.raises(InvalidRequestError, match=r"must be in 1\.\.12"):
        ox.explain(x, targets=0)
    with pytest.raises(InvalidRequestError, match="score function"):
        ox.explain(x, targets=lambda out: out[:, :1])
    with pytest.raises(UnknownNameError, match="unknown score 'prob'"):
        ox.explain(x, score="prob")
    with pytest.raises(InvalidRequestError, match=r"must have size 64 in dim 2"):
        ox.explain(torch.zeros(1, 3, 32, 32))
    with pytest.raises(InvalidRequestError, match="NaN or inf"):
        ox.explain(torch.full((1, 3, 64, 64), float("nan")))


def test_provider_is_chosen_logged_and_exposed(
    exported: Callable[[str], Exported], caplog: pytest.LogCaptureFixture
) -> None:
    path = exported("resnet_gap")[2].path
    with caplog.at_level(logging.INFO, logger="camserve.export.runtime"):
        ox = OnnxExplainer(path, threads=1)
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert ox.provider == ("CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    assert ox.device.type == ("cuda" if cuda and torch.cuda.is_available() else "cpu")
    assert f"provider {ox.provider}" in caplog.text
    assert ox.describe()["provider"] == ox.provider
    assert OnnxExplainer(path, provider="cpu").provider == "CPUExecutionProvider"
    if not cuda:
        with pytest.raises(InvalidRequestError, match="needs onnxruntime-gpu"):
            select_providers("cuda")
    with pytest.raises(UnknownNameError, match="unknown provider 'tpu'"):
        select_providers("tpu")


def test_plain_onnx_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x], [y])
    onnx.save_model(helper.make_model(graph), str(path))
    with pytest.raises(InvalidRequestError, match="not a graph written by camserve"):
        OnnxExplainer(path)


class Tokens(nn.Module):
    """Images -> (N, T, V) scores per step, like a captioner's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4 * 5)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.conv(x))
        return self.head(a.mean(dim=(2, 3))).view(-1, 4, 5)


def _first_word(out: Tensor) -> Tensor:
    return torch.log_softmax(out, dim=-1)[:, :, 0]


def test_a_traced_score_function_matches_the_engine(tmp_path: Path) -> None:
    model = Tokens().eval()
    x = torch.randn(3, 3, 12, 12)
    report = export_onnx(model, x, "conv", tmp_path / "t.onnx", targets=_first_word)
    assert report.targets == "function" and "class_ids" not in report.inputs
    ox = OnnxExplainer(report.path)
    assert ox.max_targets == 4
    got = ox.explain(x[:2], ["gradcam", "layercam", "gradcampp"], targets=4)
    ref = Explainer(model, "conv").explain(x[:2], ["gradcam", "layercam", "gradcampp"], _first_word)
    _close(got.target_scores, ref.target_scores, 1e-4)
    for m in ("gradcam", "layercam", "gradcampp"):
        _close(got.map(m), ref.map(m), MAP_TOL)


def test_graph_maps_and_torch_maps_agree(
    exported: Callable[[str], Exported],
    real_inputs: Callable[[str, int], tuple[Tensor, ...]],
) -> None:
    """map.<id> outputs (logit targets) and maps computed from the gradients are the same."""
    model, entry, report = exported("resnet_gap")
    assert {f"map.{m}" for m in ("gradcam", "gradcampp", "layercam")} <= set(report.outputs)
    (x,) = real_inputs("resnet_gap", 2)
    ox = OnnxExplainer(report.path)
    in_graph = ox.explain(x, ["gradcampp", "layercam"], targets=4)
    # options the graph's Grad-CAM++ does not take: computed from the gradients instead
    opts = {"gradcampp": {"normalize_alpha": True}}
    from_grads = ox.explain(x, ["gradcampp"], targets=4, options=opts)
    ref = Explainer(model, entry.target_layer).explain(x, ["gradcampp", "layercam"], 4)
    ref_norm = Explainer(model, entry.target_layer).explain(x, ["gradcampp"], 4, options=opts)
    for m in ("gradcampp", "layercam"):
        _close(in_graph.map(m), ref.map(m), MAP_TOL)
    _close(from_grads.map("gradcampp"), ref_norm.map("gradcampp"), MAP_TOL)
    assert not torch.allclose(from_grads.map("gradcampp"), in_graph.map("gradcampp"))

"""A zoo classifier served by ExplainService through onnxruntime answers as through torch.

The service asks its task for an explainer per layer (``Task.explainer``); the
task below hands it a :class:`FallbackExplainer` (onnxruntime at the exported
layer, the torch engine for what the graph cannot do). The service itself does
not build it yet from a spec with ``runtime="onnx"`` (see the README).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from camserve.engine import Explainer
from camserve.export import FallbackExplainer, OnnxExplainer
from camserve.service import ExplainError, ExplainRequest, ExplainResult, ExplainService
from camserve.service.images import InputTransform
from camserve.service.tasks import ClassifierTask
from tests.export.conftest import Exported


class RecordingFallback(FallbackExplainer):
    """Records which runtime answered each engine call."""

    runtimes: list[str]

    def explain(  # type: ignore[no-untyped-def]
        self, inputs, methods=("gradcam",), targets=1, score="logit", options=None
    ):
        self.runtimes.append(self.runtime_for(methods, targets))
        return super().explain(inputs, methods, targets, score, options)


class OnnxClassifierTask(ClassifierTask):
    """A classifier task whose explainer at the exported layer runs the ONNX graph."""

    def __init__(self, *args: object, onnx: OnnxExplainer, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.onnx = RecordingFallback(onnx, super().explainer(onnx.layers[0]))
        self.onnx.runtimes = []

    def explainer(self, layer: str) -> Explainer:
        if layer == self.onnx.layers[0]:
            return self.onnx  # type: ignore[return-value]  # the same explain interface
        return super().explainer(layer)


def _service(exported: Callable[[str], Exported]) -> tuple[ExplainService, RecordingFallback]:
    model, entry, report = exported("resnet_gap")
    transform = InputTransform((64, 64), entry.mean, entry.std)
    args = (model, list(entry.labels), entry.target_layer, transform)
    onnx_task = OnnxClassifierTask("onnx", *args, onnx=OnnxExplainer(report.path))
    tasks = {"torch": ClassifierTask("torch", *args), "onnx": onnx_task}
    return ExplainService(tasks), onnx_task.onnx


def _requests(model: str, image: bytes) -> list[ExplainRequest]:
    return [
        ExplainRequest(model=model, image=image, methods=("gradcam", "gradcampp", "cam"),
                       top_k=3, output="raw"),
        ExplainRequest(model=model, image=image, methods=("xgradcam", "layercam"),
                       labels=("red_circle", "blue_square"), score="probability"),
        ExplainRequest(model=model, image=image, methods=("gradcam", "scorecam"), top_k=1),
        ExplainRequest(model=model, image=image, methods=("gradcam",), class_ids=(99,)),
    ]


def test_onnx_runtime_answers_as_torch(
    exported: Callable[[str], Exported], zoo_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service, fallback = _service(exported)
    image = (zoo_store / "examples" / "scene_0.png").read_bytes()
    with caplog.at_level(logging.INFO, logger="camserve.export.runtime"):
        got = service.run(_requests("onnx", image))
    want = service.run(_requests("torch", image))
    assert "torch engine instead of onnxruntime: methods scorecam" in caplog.text
    assert sorted(fallback.runtimes) == ["onnx", "onnx", "torch"]  # top-k, named classes; scorecam
    for g, w in zip(got, want, strict=True):
        if isinstance(w, ExplainError):
            assert isinstance(g, ExplainError) and type(g.error) is type(w.error)
            assert str(g.error) == str(w.error)
            continue
        assert isinstance(g, ExplainResult) and isinstance(w, ExplainResult)
        assert [p.label for p in g.predictions] == [p.label for p in w.predictions]
        np.testing.assert_allclose(
            [p.probability for p in g.predictions], [p.probability for p in w.predictions],
            atol=1e-5,
        )
        assert [(t.label, t.id) for t in g.targets] == [(t.label, t.id) for t in w.targets]
        np.testing.assert_allclose([t.score for t in g.targets], [t.score for t in w.targets],
                                   rtol=1e-4, atol=1e-5)
        for tg, tw in zip(g.targets, w.targets, strict=True):
            assert set(tg.maps) == set(tw.maps)
            for m, mw in tw.maps.items():
                mg = tg.maps[m]
                assert mg.data is not None and mw.data is not None
                scale = max(1.0, float(np.abs(mw.data).max()))
                np.testing.assert_allclose(mg.data, mw.data, atol=1e-5 * scale)
                assert mg.box == mw.box

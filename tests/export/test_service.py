"""A spec with ``runtime = "onnx"`` served by ExplainService answers as the torch spec.

The resnet_gap zoo model is exported once (session fixture); its spec with
``runtime = "onnx"`` and the ONNX file is loaded by ``ExplainService.from_specs``
beside the same spec with runtime torch, and both answer the same requests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from camserve.codecs.http import decode_map, encode_outcome
from camserve.engine import Explainer, Explanation
from camserve.export import FallbackExplainer
from camserve.models import ModelSpec, bundle, read_spec
from camserve.service import ExplainError, ExplainRequest, ExplainResult, ExplainService
from camserve.service.outcomes import Outcome
from tests.export.conftest import Exported


@pytest.fixture(scope="module")
def specs(exported: Callable[[str], Exported], zoo_store: Path) -> tuple[ModelSpec, ModelSpec]:
    """resnet_gap's spec with runtime torch (named torch) and with runtime onnx (named onnx)."""
    _, _, report = exported("resnet_gap")
    spec = read_spec(zoo_store / "resnet_gap.toml")
    return (
        replace(spec, name="torch"),
        replace(spec, name="onnx", runtime="onnx", onnx=report.path),
    )


@pytest.fixture(scope="module")
def service(specs: tuple[ModelSpec, ModelSpec]) -> ExplainService:
    return ExplainService.from_specs(specs, device="cpu")


@pytest.fixture()
def onnx_calls(service: ExplainService) -> Iterator[list[tuple[str, ...]]]:
    """The methods of every engine call that onnxruntime answered for the onnx model."""
    fallback = service._model("onnx").task.explainer("layer2")
    assert isinstance(fallback, FallbackExplainer)
    calls: list[tuple[str, ...]] = []
    real = fallback.onnx.explain

    def counted(*args: Any, **kwargs: Any) -> Explanation:
        calls.append(tuple(args[1]))
        return real(*args, **kwargs)

    fallback.onnx.explain = counted  # type: ignore[method-assign]
    yield calls
    del fallback.onnx.explain


def _requests(model: str, image: bytes) -> list[ExplainRequest]:
    return [
        ExplainRequest(model=model, image=image, methods=("gradcam", "gradcampp", "cam"),
                       top_k=3, output="raw"),
        ExplainRequest(model=model, image=image, methods=("xgradcam", "layercam"),
                       labels=("red_circle", "blue_square"), score="probability"),
        ExplainRequest(model=model, image=image, methods=("gradcam", "scorecam"), top_k=1),
        ExplainRequest(model=model, image=image, methods=("gradcam",), class_ids=(99,)),
        ExplainRequest(model=model, image=image, methods=("gradcam",), layer="layer1", top_k=2),
    ]


def _assert_same(got: list[Outcome], want: list[Outcome]) -> None:
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


def test_onnx_spec_answers_as_the_torch_spec(
    service: ExplainService,
    onnx_calls: list[tuple[str, ...]],
    zoo_store: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = (zoo_store / "examples" / "scene_0.png").read_bytes()
    with caplog.at_level(logging.INFO, logger="camserve.export.runtime"):
        got = service.run(_requests("onnx", image))
    want = service.run(_requests("torch", image))
    # onnxruntime answered the graph's methods at its layer; scorecam fell back to torch
    assert sorted(onnx_calls) == [("gradcam", "gradcampp", "cam"), ("xgradcam", "layercam")]
    assert "torch engine instead of onnxruntime: methods scorecam" in caplog.text
    assert isinstance(got[2], ExplainResult) and "scorecam" in got[2].targets[0].maps
    assert isinstance(got[3], ExplainError)  # class 99: the same typed error
    assert isinstance(got[4], ExplainResult) and got[4].layer == "layer1"  # torch engine
    _assert_same(got, want)


def test_json_wire_answer_is_the_torch_one(service: ExplainService, zoo_store: Path) -> None:
    image = (zoo_store / "examples" / "scene_1.png").read_bytes()
    got = [encode_outcome(o) for o in service.run(_requests("onnx", image))]
    want = [encode_outcome(o) for o in service.run(_requests("torch", image))]
    for (gs, gm, gb), (ws, wm, wb) in zip(got, want, strict=True):
        assert (gs, gm) == (ws, wm)
        g, w = json.loads(gb), json.loads(wb)
        if "error" in w:
            assert g == w
            continue
        for body in (g, w):
            body.pop("timings")
            body.pop("model")
        g_maps = [t.pop("maps") for t in g["explanations"]]
        w_maps = [t.pop("maps") for t in w["explanations"]]
        for d in (g, w):
            for p in d["predictions"]:
                p["probability"], p["logit"] = round(p["probability"], 4), round(p["logit"], 3)
            for t in d["explanations"]:
                t["score"] = round(t["score"], 3)
        assert g == w
        for gm_, wm_ in zip(g_maps, w_maps, strict=True):
            assert gm_.keys() == wm_.keys()
            for m in wm_:
                assert gm_[m].get("box") == wm_[m].get("box")
                assert gm_[m]["shape"] == wm_[m]["shape"]
                want_map = decode_map(wm_[m])
                scale = max(1.0, float(np.abs(want_map).max()))
                np.testing.assert_allclose(decode_map(gm_[m]), want_map, atol=1e-5 * scale)


def test_describe_and_explainers_name_the_runtime(service: ExplainService) -> None:
    onnx, torch_ = service.describe("onnx"), service.describe("torch")
    assert (onnx.runtime, onnx.device) == ("onnx", "cpu")
    assert (torch_.runtime, torch_.device) == ("torch", "cpu")
    task = service._model("onnx").task
    assert isinstance(task.explainer("layer2"), FallbackExplainer)
    assert isinstance(task.explainer("layer1"), Explainer)  # other layers: the torch engine


def test_bundle_of_an_onnx_spec_serves(
    specs: tuple[ModelSpec, ModelSpec], service: ExplainService, zoo_store: Path,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    model_toml = bundle(specs[1], tmp_path / "bundle")
    assert (tmp_path / "bundle" / Path(str(specs[1].onnx)).name).is_file()
    spec = read_spec(model_toml)
    assert spec.runtime == "onnx" and spec.onnx is not None
    assert spec.onnx.parent == tmp_path / "bundle"
    with caplog.at_level(logging.INFO, logger="camserve.models.loading"):
        served = ExplainService.from_specs([spec], device="cpu")
    assert "model onnx: onnx (CPUExecutionProvider, cpu) at layer layer2" in caplog.text
    image = (zoo_store / "examples" / "scene_0.png").read_bytes()
    (out,) = served.run([ExplainRequest(model="onnx", image=image, methods=("gradcam",))])
    (want,) = service.run([ExplainRequest(model="torch", image=image, methods=("gradcam",))])
    _assert_same([out], [want])

"""The handlers' JSON path: shared engine calls, same numbers as the engine, per-item errors."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camserve.codecs.http import decode_map
from camserve.engine import Explainer
from camserve.service.images import decode_image

from .conftest import LABELS, TRANSFORM, JsonRunner, RecordingSink, json_item, make_runner, png


def engine_direct(model: nn.Module, layer: str, image: bytes, **kw: Any) -> Any:
    x = TRANSFORM(decode_image(image))[None]
    with torch.enable_grad():
        return Explainer(model, layer).explain(x, **kw)


def solid_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def body(result: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(result.body)
    return out


def test_single_request_matches_the_engine(gap_model: nn.Module) -> None:
    runner = make_runner(gap_model)
    image = png(3)
    [res] = runner.run([json_item(image, methods=["gradcam", "gradcampp"], top_k=2)])
    assert res.status == 200, res.body
    out = body(res)
    exp = engine_direct(gap_model, "features.3", image, methods=("gradcam", "gradcampp"), targets=2)
    assert out["model"] == "tiny" and out["layer"] == "features.3"
    assert out["image_size"] == [24, 20] and out["input_size"] == [16, 16]
    probs = exp.probabilities[0]
    assert [p["id"] for p in out["predictions"]] == torch.argsort(probs, descending=True).tolist()
    assert out["predictions"][0]["label"] == LABELS[out["predictions"][0]["id"]]
    assert len(out["explanations"]) == 2
    for j, e in enumerate(out["explanations"]):
        assert e["id"] == int(exp.target_ids[0, j])
        assert e["score"] == pytest.approx(float(exp.target_scores[0, j]), abs=1e-5)
        for m in ("gradcam", "gradcampp"):
            got = decode_map(e["maps"][m])
            assert got.shape == (16, 16)
            np.testing.assert_allclose(got, exp.upsampled(m)[0, j].numpy(), atol=1e-6)
    assert {"decode", "forward", "backward", "encode"} <= set(out["timings"])
    assert out["batch_size"] == 1
    assert ", " not in res.body and ": " not in res.body  # compact JSON


def test_raw_output_is_the_layer_map(gap_model: nn.Module) -> None:
    image = png(4)
    [res] = make_runner(gap_model).run([json_item(image, output="raw", class_ids=[2, 0])])
    exp = engine_direct(gap_model, "features.3", image, methods=("gradcam",), targets=[[2, 0]])
    out = body(res)
    assert [e["id"] for e in out["explanations"]] == [2, 0]
    for j, e in enumerate(out["explanations"]):
        np.testing.assert_allclose(decode_map(e["maps"]["gradcam"]), exp.map("gradcam")[0, j])


def test_png_and_box_outputs(gap_model: nn.Module) -> None:
    runner = make_runner(gap_model)
    [a, b] = runner.run(
        [json_item(png(5), output="png"), json_item(png(5), output="box", threshold=0.5)]
    )
    entry = body(a)["explanations"][0]["maps"]["gradcam"]
    img = Image.open(io.BytesIO(base64.b64decode(entry["data"])))
    assert img.format == "PNG" and img.size == (16, 16)
    box_only = body(b)["explanations"][0]["maps"]["gradcam"]
    assert set(box_only) == {"box"}
    x0, y0, x1, y1 = box_only["box"]
    assert 0 <= x0 <= x1 < 20 and 0 <= y0 <= y1 < 24  # the caller's image is 20 x 24


def test_raw_body_with_query_options(gap_model: nn.Module) -> None:
    data = {"body": png(6), "methods": b"xgradcam", "labels": b"green square"}
    [res] = make_runner(gap_model).run([(data, {"X-Camserve-Score": "probability"})])
    out = body(res)
    assert out["score"] == "probability"
    assert out["explanations"][0]["label"] == "green square"
    assert list(out["explanations"][0]["maps"]) == ["xgradcam"]


def test_mixed_batch_one_bad_item_fails_alone(gap_model: nn.Module) -> None:
    runner = make_runner(gap_model)
    good = json_item(png(7), methods=["gradcam"], top_k=1)
    items = [
        good,
        json_item(png(8), methods=["gradcamx"]),
        ({"body": b"\x89PNG\r\n\x1a\n broken"}, {}),
        json_item(png(9), labels=["purple"]),
        json_item(png(9), class_ids=[7]),
        json_item(png(9), layer="features.9"),
        json_item(solid_png(300, 300)),
        json_item(png(11), class_ids=[1], methods=["gradcam", "layercam"]),
        json_item(png(12), top_k="three"),
    ]
    results = runner.run(items)
    assert [r.status for r in results] == [200, 400, 400, 400, 400, 400, 413, 200, 400]
    msgs = [r.message for r in results]
    assert "unknown method 'gradcamx'; valid methods:" in msgs[1] and "gradcampp" in msgs[1]
    assert "corrupt or truncated" in msgs[2] or "cannot identify" in msgs[2]
    assert (
        msgs[3] == "unknown label 'purple'; valid labels: blue triangle, green square, red circle"
    )
    assert msgs[4] == "unknown class 7; valid classes: 0, 1, 2"
    assert msgs[5].startswith("unknown layer 'features.9'; valid layers:")
    assert "90000 pixels; the limit is 50000" in msgs[6]
    assert "top_k must be an integer" in msgs[8]
    err = body(results[1])["error"]
    assert err == {"type": "UnknownNameError", "status": 400, "message": msgs[1]}
    # The good items answer exactly what they would answer alone.
    [alone] = make_runner(gap_model).run([good])
    a = decode_map(body(alone)["explanations"][0]["maps"]["gradcam"])
    b = decode_map(body(results[0])["explanations"][0]["maps"]["gradcam"])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert body(results[0])["batch_size"] == 9


def test_one_engine_call_per_compatible_group(
    gap_model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, tuple[str, ...], Any]] = []
    real = Explainer.explain

    def spy(self: Explainer, inputs: Any, **kw: Any) -> Any:
        calls.append((int(inputs.shape[0]), tuple(kw["methods"]), kw["targets"]))
        return real(self, inputs, **kw)

    monkeypatch.setattr(Explainer, "explain", spy)
    runner = make_runner(gap_model)
    results = runner.run(
        [
            json_item(png(1), methods=["gradcam"], top_k=1),
            json_item(png(2), methods=["xgradcam", "gradcam"], top_k=3),
            json_item(png(3), methods=["layercam"], class_ids=[2]),
            json_item(png(4), methods=["gradcam"], class_ids=[0, 1]),
        ]
    )
    assert all(r.ok for r in results)
    assert sorted(calls, key=lambda c: str(c[2])) == sorted(
        [(2, ("gradcam", "xgradcam"), 3), (2, ("layercam", "gradcam"), [[2, 2], [0, 1]])],
        key=lambda c: str(c[2]),
    )
    # Each item gets only its own methods and targets.
    out = [body(r) for r in results]
    assert [len(o["explanations"]) for o in out] == [1, 3, 1, 2]
    assert list(out[0]["explanations"][0]["maps"]) == ["gradcam"]
    assert list(out[2]["explanations"][0]["maps"]) == ["layercam"]
    assert [e["id"] for e in out[3]["explanations"]] == [0, 1]


def test_unsupported_method_fails_only_its_item(fc_model: nn.Module) -> None:
    runner = make_runner(fc_model)
    results = runner.run([json_item(png(1)), json_item(png(2), methods=["cam"]), json_item(png(3))])
    assert [r.status for r in results] == [200, 400, 200]
    assert "cam" in results[1].message.lower()


def test_empty_batch(gap_model: nn.Module) -> None:
    assert make_runner(gap_model).run([]) == []


def test_metrics_per_stage_method_and_request(gap_model: nn.Module) -> None:
    sink = RecordingSink()
    runner = JsonRunner(make_runner(gap_model).task, sink)
    runner.run([json_item(png(1), methods=["gradcam", "xgradcam"]), json_item(b"nope")])
    names = {(n, tuple(sorted(lab.items()))) for n, _, lab in sink.records}
    cpu = ("device", "cpu")
    assert (
        "camserve_method_latency_seconds",
        (cpu, ("method", "gradcam"), ("model", "tiny")),
    ) in names
    forward = (cpu, ("model", "tiny"), ("stage", "forward"))
    assert ("camserve_stage_latency_seconds", forward) in names
    statuses = sorted(lab["status"] for n, _, lab in sink.records if n == "camserve_requests_total")
    assert statuses == ["InvalidImageError", "ok"]
    assert all(v >= 0 for _, v, _ in sink.records)


def test_an_unexpected_failure_answers_500_for_that_item_only(
    gap_model: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    runner = make_runner(gap_model)
    task = runner.task
    real_prepare = task.prepare

    def prepare(item: Any) -> None:
        if item.request.layer == "features.1":
            raise RuntimeError("a bug")
        real_prepare(item)

    task.prepare = prepare  # type: ignore[method-assign]  # a bug, injected
    results = runner.run([json_item(png(1)), json_item(png(2), layer="features.1")])
    assert [r.status for r in results] == [200, 500]
    assert body(results[1])["error"]["type"] == "InternalError"
    assert "admitting request 1 of 2 failed" in caplog.text


def test_bodies_are_plain_compact_json(gap_model: nn.Module) -> None:
    runner = make_runner(gap_model)
    items = [
        json_item(png(3), methods=["gradcam", "gradcampp"], top_k=2),
        json_item(png(4), methods=["gradcam"], output="raw"),
        json_item(png(5), methods=["gradcam"], output="png"),
    ]
    for res in runner.run(items):
        assert res.status == 200, res.body
        assert res.body == json.dumps(json.loads(res.body), separators=(",", ":"))


def test_method_options_reach_the_engine_and_split_groups(
    gap_model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real = Explainer.explain

    def spy(self: Explainer, inputs: Any, **kw: Any) -> Any:
        calls.append(kw["options"])
        return real(self, inputs, **kw)

    monkeypatch.setattr(Explainer, "explain", spy)
    image = png(6)
    opts = {"occlusion": {"mask": 4, "stride": 4}}
    a, b = make_runner(gap_model).run(
        [
            json_item(image, methods=["occlusion"], options=opts),
            json_item(image, methods=["occlusion"]),
        ]
    )
    assert sorted(map(str, calls)) == sorted([str(opts), "{}"])  # two calls, not one
    exp = engine_direct(gap_model, "features.3", image, methods=("occlusion",), options=opts)
    got = decode_map(body(a)["explanations"][0]["maps"]["occlusion"])
    np.testing.assert_allclose(got, exp.upsampled("occlusion")[0, 0].numpy(), atol=1e-6)
    assert not np.allclose(got, decode_map(body(b)["explanations"][0]["maps"]["occlusion"]))

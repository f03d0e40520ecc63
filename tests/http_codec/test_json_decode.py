"""The codec's other direction: a client's JSON request body and its decoded answers.

``encode_json_request`` must give back the same request through ``parse_request``;
``decode_outcome(encode_outcome(x))`` must give back ``x`` (maps exactly, scores
to the JSON's six decimals), for real results of the zoo's three model kinds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from camserve.codecs.http import (
    decode_outcome,
    encode_json_request,
    encode_outcome,
    parse_request,
)
from camserve.errors import InvalidRequestError, OverloadedError
from camserve.models import resolve
from camserve.service import ExplainError, ExplainRequest, ExplainResult, ExplainService

STORE = Path(__file__).resolve().parents[2] / "model_store"


@pytest.fixture(scope="module")
def service() -> ExplainService:
    if not (STORE / "resnet_gap.toml").exists():
        pytest.fail("model_store/ is not built: run `camserve build-models`")
    return ExplainService.from_specs(
        [resolve(n, STORE) for n in ("resnet_gap", "captioner", "vqa")]
    )


def scene() -> bytes:
    return (STORE / "examples" / "scene_1.png").read_bytes()


def test_json_request_round_trip() -> None:
    req = ExplainRequest(
        "vqa", image=scene(), methods=("gradcam", "occlusion"), layer="cnn.5", score="probability",
        output="box", threshold=0.3, question="what shape is it", answers=("circle",),
        options={"occlusion": {"mask": 9, "stride": 4}}, request_id="r",
    )  # fmt: skip
    back = parse_request(encode_json_request(req), model="vqa", request_id="r")
    assert back == dataclasses.replace(req, deadline=None)
    predict = ExplainRequest("m", image=scene(), predict_only=True, top_k=3)
    assert parse_request(encode_json_request(predict), model="m") == predict


def test_json_tensor_inputs_round_trip_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    x[0, 0, :3] = [0.0, -0.0, np.finfo(np.float32).tiny]
    req = ExplainRequest("m", tensor=x, methods=("layercam",), class_ids=(2,), predict_only=True)
    back = parse_request(encode_json_request(req), model="m")
    assert back.image is None and back.predict_only and back.class_ids == (2,)
    assert back.tensor is not None and back.tensor.dtype == np.float32
    assert back.tensor.tobytes() == x.tobytes()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tensor": [1, 2]}, "tensor must be an object"),
        ({"tensor": {"shape": [3, 2], "data": ""}}, r"shape must be \[C, H, W\]"),
        ({"tensor": {"shape": [3, 2, 0], "data": ""}}, "positive ints"),
        ({"tensor": {"shape": [1, 2, 2], "dtype": "float64", "data": ""}}, "dtype must be"),
        ({"tensor": {"shape": [1, 2, 2], "data": "AAAA"}}, "has 3 bytes; shape .* needs 16"),
        ({"tensor": {"shape": [1, 1, 1], "data": "!!"}}, "tensor data is not valid base64"),
        ({"tensor": {"shape": [1, 1, 1], "data": "AADAfw=="}}, "NaN or infinite"),
        ({"image": "AAAA", "tensor": {"shape": [1, 1, 1], "data": "AAAAAA=="}}, "not both"),
        ({"methods": ["gradcam"]}, "no 'image' field"),
        ({"image": "AAAA", "predict_only": "maybe"}, "predict_only must be true or false"),
    ],
)
def test_bad_tensor_and_predict_only_fields_name_the_problem(
    body: dict[str, object], message: str
) -> None:
    import json

    with pytest.raises(InvalidRequestError, match=message):
        parse_request(json.dumps(body).encode(), model="m")


def test_predict_only_as_a_header_of_a_raw_image() -> None:
    req = parse_request(scene(), {"X-Camserve-Predict-Only": "true"}, model="m")
    assert req.predict_only and req.image == scene()
    req = parse_request(scene(), {"X-Camserve-Predict-Only": "0"}, model="m")
    assert not req.predict_only


def same(a: ExplainResult, b: ExplainResult) -> None:
    assert (a.model, a.kind, a.layer, a.score, a.output) == (
        b.model,
        b.kind,
        b.layer,
        b.score,
        b.output,
    )
    assert (a.image_size, a.input_size, a.caption, a.words, a.question, a.answer) == (
        b.image_size, b.input_size, b.caption, b.words, b.question, b.answer,
    )  # fmt: skip
    assert [(p.id, p.label) for p in a.predictions] == [(p.id, p.label) for p in b.predictions]
    for p, q in zip(a.predictions, b.predictions, strict=True):
        assert p.probability == pytest.approx(q.probability, abs=1e-6)
    for s, t in zip(a.targets, b.targets, strict=True):
        assert (s.kind, s.label, s.id, s.position) == (t.kind, t.label, t.id, t.position)
        assert s.score == pytest.approx(t.score, abs=1e-6)
        assert s.maps.keys() == t.maps.keys()
        for m in s.maps:
            x, y = s.maps[m], t.maps[m]
            assert (x.method, x.layer, x.box, x.png) == (y.method, y.layer, y.box, y.png)
            assert (x.data is None) == (y.data is None)
            if x.data is not None and y.data is not None:
                assert np.array_equal(x.data, y.data)


@pytest.mark.parametrize(
    "req",
    [
        ExplainRequest("resnet_gap", image=scene(), methods=("gradcam", "guided_gradcam"), top_k=2,
                       output="raw"),
        ExplainRequest("resnet_gap", image=scene(), methods=("layercam",), output="png"),
        ExplainRequest("captioner", image=scene(), output="box"),
        ExplainRequest("vqa", image=scene(), question="what shape is it", answers=("circle",)),
    ],
    ids=["classifier-raw", "classifier-png", "captioner", "vqa"],
)  # fmt: skip
def test_decode_outcome_inverts_encode_outcome(
    service: ExplainService, req: ExplainRequest
) -> None:
    (outcome,) = service.run([dataclasses.replace(req, request_id="x")])
    assert isinstance(outcome, ExplainResult)
    d = service.describe(req.model)
    inputs = frozenset(m.id for m in d.methods if m.resolution == "input")
    _, _, body = encode_outcome(outcome)
    back = decode_outcome(body, req, labels=d.labels, input_methods=inputs)
    assert isinstance(back, ExplainResult)
    same(outcome, back)


def test_decode_outcome_of_errors() -> None:
    req = ExplainRequest("resnet_gap", image=b"x", request_id="e")
    for error in (InvalidRequestError("bad top_k 0"), OverloadedError("busy")):
        _, _, body = encode_outcome(ExplainError("e", "resnet_gap", error))
        back = decode_outcome(body, req)
        assert isinstance(back, ExplainError) and back.request_id == "e"
        assert type(back.error) is type(error) and str(back.error) == str(error)

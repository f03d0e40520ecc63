"""The request codec: JSON bodies, raw bodies with query/header options, bad input."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from camserve.codecs import http
from camserve.errors import InvalidRequestError
from camserve.service.request import DEFAULT_METHODS, ExplainRequest

IMG = b"\x89PNG\r\n\x1a\nfake"
B64 = base64.b64encode(IMG).decode()


def parse_request(data: Any, headers: dict[str, str] | None = None) -> ExplainRequest:
    return http.parse_request(data, headers, model="m")


def test_json_body_as_dict_with_all_options() -> None:
    req = parse_request(
        {
            "body": {
                "image": B64,
                "methods": ["gradcam", "gradcampp", "gradcam"],
                "labels": ["red circle"],
                "class_ids": [3, 3, 1],
                "layer": "layer4",
                "score": "Probability",
                "output": "png",
                "threshold": 0.2,
            }
        }
    )
    assert req == ExplainRequest(
        model="m",
        image=IMG,
        methods=("gradcam", "gradcampp"),
        class_ids=(3, 1),
        labels=("red circle",),
        layer="layer4",
        score="probability",
        output="png",
        threshold=0.2,
    )


def test_json_body_as_bytes_and_data_uri() -> None:
    body = json.dumps({"image": "data:image/png;base64," + B64, "top_k": 3}).encode()
    req = parse_request({"body": body})
    assert req.image == IMG
    assert req.top_k == 3 and req.k == 3
    assert req.methods == DEFAULT_METHODS
    assert req.output == "normalized" and req.score == "logit" and req.threshold == 0.15


def test_raw_body_with_query_and_header_options() -> None:
    data = {"body": bytearray(IMG), "methods": b"gradcam,xgradcam", "top_k": b"2"}
    headers = {"X-Camserve-Output": "raw", "X-Camserve-Methods": "cam", "Content-Type": "image/png"}
    req = parse_request(data, headers)
    assert req.image == IMG
    assert req.methods == ("gradcam", "xgradcam")  # the query wins over the header
    assert req.output == "raw"
    assert req.top_k == 2


def test_grpc_style_data_key_and_vqa_fields() -> None:
    req = parse_request(
        {"data": IMG, "question": b"what colour is the circle?", "answers": b"green, yellow"}
    )
    assert req.question == "what colour is the circle?"
    assert req.answers == ("green", "yellow")


def test_plain_bytes_body() -> None:
    assert parse_request(IMG).image == IMG


def test_normalised_spelling_is_accepted() -> None:
    assert parse_request({"body": {"image": B64, "output": "normalised"}}).output == "normalized"


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"image": B64, "methods": "gradcam", "colour": 1}, "unknown field 'colour'; valid fields"),
        ({"methods": ["gradcam"]}, "no 'image' field"),
        ({"image": 12}, "image must be a base64 string, got int"),
        ({"image": "!!!notbase64"}, "not valid base64"),
        ({"image": B64, "methods": [1, 2]}, "methods must be a list of strings"),
        ({"image": B64, "methods": []}, "methods is empty"),
        ({"image": B64, "methods": {"a": 1}}, "got dict"),
        ({"image": B64, "top_k": 0}, "top_k must be between 1 and 20, got 0"),
        ({"image": B64, "top_k": "three"}, "top_k must be an integer, got 'three'"),
        ({"image": B64, "top_k": True}, "got a boolean"),
        ({"image": B64, "top_k": 2, "class_ids": [1]}, "either top_k or class_ids"),
        ({"image": B64, "class_ids": [-1]}, "class_ids must be between 0"),
        ({"image": B64, "class_ids": ["x"]}, "class_ids must be an integer, got 'x'"),
        ({"image": B64, "score": "softmax"}, "unknown score 'softmax'; valid scores: logit, prob"),
        ({"image": B64, "output": "jpeg"}, "unknown output 'jpeg'; valid outputs: raw, normal"),
        ({"image": B64, "threshold": 0}, "threshold must be in (0.0, 1.0], got 0"),
        ({"image": B64, "threshold": "nan"}, "threshold must be in"),
        ({"image": B64, "threshold": [1]}, "threshold must be a number"),
        ({"image": B64, "layer": ""}, "layer must have 1 to 200 characters"),
        ({"image": B64, "question": 5}, "question must be a string, got int"),
        ({"image": B64, "methods": ["m"] * 1 + [f"m{i}" for i in range(9)]}, "at most 8 methods"),
    ],
)
def test_bad_json_fields_name_the_problem(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        parse_request({"body": body})


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"body": b"{not json"}, "body is not valid JSON"),
        ({"body": None}, "no body"),
        ({}, "no body"),
        ({"body": 3.5}, "must be an image or a JSON object, got float"),
        ({"body": b'  {"a": [1'}, "not valid JSON"),
        ({"body": IMG, "top_k": b"\xff"}, "not valid UTF-8"),
    ],
)
def test_bad_bodies(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        parse_request(data)


def test_json_array_body_is_refused() -> None:
    # '[' is not sniffed as JSON, so it is treated as image bytes (rejected by the decoder);
    # an already-parsed list is refused here.
    with pytest.raises(InvalidRequestError, match="got list"):
        parse_request({"body": [1, 2]})


def test_method_options_as_a_json_field_or_header() -> None:
    req = parse_request({"body": {"image": B64, "methods": ["occlusion"],
                                  "options": {"occlusion": {"mask": 8, "stride": 4}}}})
    assert req.options == {"occlusion": {"mask": 8, "stride": 4}}
    req = parse_request({"body": IMG}, {"X-Camserve-Options": '{"gradcampp": {"stats": true}}'})
    assert req.options == {"gradcampp": {"stats": True}}


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"occlusion": {"mask": "big"}}, "option occlusion.mask must be int, got 'big'"),
        ({"occlusion": {"size": 3}}, "unknown option 'occlusion.size'"),
        ({"nosuch": {}}, "unknown method 'nosuch'"),
        ({"ablationcam": {"form": "max"}}, "unknown ablationcam.form value 'max'"),
        ([1], "options must map method ids to objects"),
    ],
)
def test_bad_method_options(options: Any, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        parse_request({"body": {"image": B64, "options": options}})

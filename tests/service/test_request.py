"""ExplainRequest's constructor checks every field and names the field and the value."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest

from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.service import ExplainRequest

IMG = b"\x89PNG\r\n\x1a\nfake"


def test_defaults_and_normalisation() -> None:
    req = ExplainRequest(
        model="m",
        image=bytearray(IMG),  # type: ignore[arg-type]  # bytes-like is accepted
        methods=["gradcam", "layercam", "gradcam"],  # type: ignore[arg-type]
        class_ids=[3, 3, 1],  # type: ignore[arg-type]
        options={"occlusion": {"mask": 8}},
    )
    assert req.image == IMG and isinstance(req.image, bytes)
    assert req.methods == ("gradcam", "layercam") and req.class_ids == (3, 1)
    assert req.options == {"occlusion": {"mask": 8}} and req.k == 1
    assert req.score == "logit" and req.output == "normalized" and req.threshold == 0.15
    t = ExplainRequest(model="m", tensor=np.zeros((3, 4, 4), np.float32))
    assert t.image is None
    import pickle

    assert pickle.loads(pickle.dumps(req)) == req  # requests may cross process boundaries


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"model": ""}, "model must have 1 to 200 characters, got ''"),
        ({"model": 3}, "model must be a string, got int"),
        ({"image": None}, "the request has no image"),
        ({"tensor": np.zeros((3, 2, 2), np.float32)}, "either image or tensor, not both"),
        ({"image": "abc"}, "image must be bytes, got str"),
        ({"methods": ()}, "methods is empty"),
        ({"methods": "gradcam"}, "methods must be a sequence of strings, got 'gradcam'"),
        ({"methods": tuple(f"m{i}" for i in range(9))}, "at most 8 methods per request, got 9"),
        ({"methods": ("gradcamx",)}, "unknown method 'gradcamx'; valid methods:"),
        ({"top_k": 0}, "top_k must be between 1 and 20, got 0"),
        ({"top_k": True}, "top_k must be an integer, got True"),
        ({"top_k": 2, "labels": ("a",)}, "either top_k or class_ids/labels, not both"),
        ({"class_ids": (-1,)}, "class_ids must be between 0 and 2147483647, got -1"),
        ({"class_ids": ("1",)}, "class_ids must be an integer, got '1'"),
        ({"class_ids": tuple(range(21))}, "at most 20 targets per request"),
        ({"labels": ("",)}, "labels must have 1 to 500 characters, got ''"),
        ({"answers": tuple(f"a{i}" for i in range(21))}, "at most 20 answers per request"),
        ({"layer": ""}, "layer must have 1 to 200 characters"),
        ({"score": "softmax"}, "unknown score 'softmax'; valid scores: logit, probability"),
        ({"output": "jpeg"}, "unknown output 'jpeg'; valid outputs: box, normalized, png, raw"),
        ({"threshold": 0.0}, "threshold must be in (0.0, 1.0], got 0.0"),
        ({"threshold": math.nan}, "threshold must be a number, got nan"),
        ({"threshold": "0.2"}, "threshold must be a number, got '0.2'"),
        ({"question": "  "}, "question must have 1 to 500 characters"),
        (
            {"options": {"occlusion": {"mask": "big"}}},
            "option occlusion.mask must be int, got 'big'",
        ),
        ({"options": {"occlusion": {"size": 1}}}, "unknown option 'occlusion.size'"),
        ({"options": {"gradcamx": {}}}, "unknown method 'gradcamx'"),
        ({"options": {"occlusion": 3}}, "options['occlusion'] must be a mapping, got int"),
        (
            {"options": {"occlusion": {"fill": math.inf}}},
            "option occlusion.fill must be a finite number",
        ),
        (
            {"options": {"guided_backprop": {"reduce": "max"}}},
            "unknown guided_backprop.reduce value",
        ),
        ({"predict_only": 1}, "predict_only must be a boolean, got 1"),
        ({"boxes": "yes"}, "boxes must be a boolean, got 'yes'"),
        ({"request_id": 5}, "request_id must be a string of at most 200 characters, got 5"),
        ({"deadline": math.inf}, "deadline must be a time.monotonic() instant, got inf"),
    ],
)
def test_each_bad_field_is_named(fields: dict[str, Any], needle: str) -> None:
    kw: dict[str, Any] = {"model": "m", "image": IMG, **fields}
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        ExplainRequest(**kw)


@pytest.mark.parametrize(
    "tensor, needle",
    [
        (np.zeros((3, 4, 4), np.float64), "tensor must be float32, got float64"),
        (np.zeros((4, 4), np.float32), "tensor must be (C, H, W), got shape (4, 4)"),
        (np.full((3, 2, 2), np.nan, np.float32), "tensor has NaN or infinite values"),
        ([[[0.0]]], "tensor must be a numpy array, got list"),
    ],
)
def test_bad_tensors(tensor: Any, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        ExplainRequest(model="m", tensor=tensor)


def test_unknown_names_are_unknown_name_errors() -> None:
    with pytest.raises(UnknownNameError):
        ExplainRequest(model="m", image=IMG, methods=("nosuch",))

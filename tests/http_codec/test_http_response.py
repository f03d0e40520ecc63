"""The response encoder: float32 maps, PNG overlays, boxes in the caller's pixels, errors."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.codecs import http as response
from camserve.codecs.http import decode_map, dumps, encode_error, encode_map, spliced
from camserve.errors import (
    CamserveError,
    DeadlineExceededError,
    ImageTooLargeError,
    InternalError,
    ModelFailureError,
    OverloadedError,
    UnavailableError,
    UnknownNameError,
)
from camserve.render import overlay_png, scale_box
from camserve.service.outcomes import MapResult


def entry(output: str, raw: torch.Tensor, norm: torch.Tensor, box: list[int], image=None):  # type: ignore[no-untyped-def]
    """The codec's map entry for ``output``, as the service would build it."""
    png = overlay_png(norm, image) if output == "png" else None
    data = {"raw": raw.numpy(), "normalized": norm.numpy()}.get(output)
    m = MapResult("gradcam", "layer", data=data, png=png, box=(box[0], box[1], box[2], box[3]))
    out = encode_map(m)
    if isinstance(out.get("data"), response.Spliced):
        out["data"] = out["data"].text
    return out


def test_float32_maps_round_trip_exactly() -> None:
    raw = torch.randn(3, 5)
    norm = torch.rand(8, 10)
    r = entry("raw", raw, norm, [0, 0, 1, 1])
    assert r["shape"] == [3, 5] and r["dtype"] == "float32" and r["box"] == [0, 0, 1, 1]
    np.testing.assert_array_equal(decode_map(r), raw.numpy())
    n = entry("normalized", raw, norm, [0, 0, 1, 1])
    np.testing.assert_array_equal(decode_map(n), norm.numpy())
    assert entry("box", raw, norm, [1, 2, 3, 4]) == {"box": [1, 2, 3, 4]}
    assert encode_map(MapResult("gradcam", "layer")) == {}  # no box asked for


def test_png_overlay_is_a_png_of_the_input_size() -> None:
    norm = torch.zeros(6, 4)
    norm[0, 0] = 1.0
    image = np.full((6, 4, 3), 100, dtype=np.uint8)
    img = Image.open(io.BytesIO(overlay_png(norm, image)))
    assert img.size == (4, 6)
    px = np.asarray(img)
    assert not np.array_equal(px[0, 0], px[5, 3])  # hot and cold pixels differ
    e = entry("png", torch.zeros(2, 2), norm, [0, 0, 0, 0], image)
    assert Image.open(io.BytesIO(base64.b64decode(e["data"]))).format == "PNG"
    assert e["format"] == "png" and e["box"] == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "box, input_size, image_size, want",
    [
        ((0, 0, 63, 63), (64, 64), (64, 64), [0, 0, 63, 63]),
        ((0, 0, 63, 63), (64, 64), (128, 32), [0, 0, 127, 31]),
        ((10, 20, 10, 20), (64, 64), (128, 128), [20, 40, 21, 41]),
    ],
)
def test_boxes_are_scaled_to_the_callers_image(
    box: tuple[int, int, int, int],
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    want: list[int],
) -> None:
    assert list(scale_box(box, input_size, image_size)) == want


def test_errors_carry_status_type_and_message() -> None:
    status, message, body = encode_error(UnknownNameError("method", "x", ["gradcam"]))
    assert status == 400 and message == "unknown method 'x'; valid methods: gradcam"
    assert json.loads(body) == {
        "error": {"type": "UnknownNameError", "status": 400, "message": message}
    }
    assert encode_error(ImageTooLargeError("too big"))[0] == 413


@pytest.mark.parametrize(
    "error, status",
    [
        (CamserveError("x"), 500),
        (InternalError("x"), 500),
        (ModelFailureError("nan", model="m"), 500),
        (OverloadedError("x"), 503),
        (UnavailableError("x"), 503),
        (DeadlineExceededError("x"), 504),
    ],
)
def test_the_http_table(error: CamserveError, status: int) -> None:
    assert response.http_status(error) == status
    assert json.loads(encode_error(error)[2])["error"]["status"] == status


def test_dumps_is_compact_and_refuses_nan() -> None:
    assert dumps({"a": [1, 2]}) == '{"a":[1,2]}'
    with pytest.raises(ValueError):
        dumps({"a": float("nan")})


def test_spliced_maps_give_the_same_json_as_plain_strings() -> None:
    raw, norm = torch.rand(3, 4), torch.rand(6, 8)
    entries = [
        entry("normalized", raw, norm, [0, 1, 2, 3]),
        entry("raw", raw, norm, [1, 1, 1, 1]),
    ]
    plain = {"a": [dict(e) for e in entries], "q": 'x"y\\', "n": 0.5}
    marked = {"a": [spliced(dict(e)) for e in entries], "q": 'x"y\\', "n": 0.5}
    assert not isinstance(marked["a"][0]["data"], str)
    expected = json.dumps(plain, separators=(",", ":"), allow_nan=False)
    assert dumps(marked) == expected == dumps(plain)
    # The marker inside the payload's own text falls back to plain encoding.
    marked["q"] = plain["q"] = response._NONCE
    assert dumps(marked) == json.dumps(plain, separators=(",", ":"), allow_nan=False)
    assert spliced({"box": [0, 0, 1, 1]}) == {"box": [0, 0, 1, 1]}
    with pytest.raises(TypeError):
        dumps({"x": object()})
    with pytest.raises(ValueError):
        dumps({"x": float("nan"), "m": spliced(dict(entries[0]))})

"""The response encoder: float32 maps, PNG overlays, boxes in the caller's pixels, errors."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.errors import ImageTooLargeError, UnknownNameError
from camserve.serving import response
from camserve.serving.response import (
    decode_map,
    dumps,
    encode_error,
    encode_map,
    overlay_png,
    scale_box,
    spliced,
)


def test_float32_maps_round_trip_exactly() -> None:
    raw = torch.randn(3, 5)
    norm = torch.rand(8, 10)
    r = encode_map("raw", raw, norm, [0, 0, 1, 1])
    assert r["shape"] == [3, 5] and r["dtype"] == "float32" and r["box"] == [0, 0, 1, 1]
    np.testing.assert_array_equal(decode_map(r), raw.numpy())
    n = encode_map("normalized", raw, norm, [0, 0, 1, 1])
    np.testing.assert_array_equal(decode_map(n), norm.numpy())
    assert encode_map("box", raw, norm, [1, 2, 3, 4]) == {"box": [1, 2, 3, 4]}


def test_png_overlay_is_a_png_of_the_input_size() -> None:
    norm = torch.zeros(6, 4)
    norm[0, 0] = 1.0
    image = np.full((6, 4, 3), 100, dtype=np.uint8)
    img = Image.open(io.BytesIO(overlay_png(norm, image)))
    assert img.size == (4, 6)
    px = np.asarray(img)
    assert not np.array_equal(px[0, 0], px[5, 3])  # hot and cold pixels differ
    entry = encode_map("png", torch.zeros(2, 2), norm, [0, 0, 0, 0], image)
    assert Image.open(io.BytesIO(base64.b64decode(entry["data"]))).format == "PNG"
    with pytest.raises(ValueError, match="needs the input image"):
        encode_map("png", torch.zeros(2, 2), norm, [0, 0, 0, 0])


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
    assert scale_box(box, input_size, image_size) == want


def test_errors_carry_status_type_and_message() -> None:
    status, message, body = encode_error(UnknownNameError("method", "x", ["gradcam"]))
    assert status == 400 and message == "unknown method 'x'; valid methods: gradcam"
    assert json.loads(body) == {
        "error": {"type": "UnknownNameError", "status": 400, "message": message}
    }
    assert encode_error(ImageTooLargeError("too big"))[0] == 413


def test_dumps_is_compact_and_refuses_nan() -> None:
    assert dumps({"a": [1, 2]}) == '{"a":[1,2]}'
    with pytest.raises(ValueError):
        dumps({"a": float("nan")})


def test_spliced_maps_give_the_same_json_as_plain_strings() -> None:
    raw, norm = torch.rand(3, 4), torch.rand(6, 8)
    entries = [
        encode_map("normalized", raw, norm, [0, 1, 2, 3]),
        encode_map("raw", raw, norm, [1, 1, 1, 1]),
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

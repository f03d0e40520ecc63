"""Image decoding: formats, caps checked from the header, corrupt data, bombs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.codecs.http import http_status
from camserve.errors import ImageTooLargeError, InvalidImageError
from camserve.service.images import DecodedImage, ImageLimits, InputTransform, decode_image


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_png_round_trip() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    img = decode_image(encode(arr))
    assert img.format == "PNG"
    assert img.size == (5, 7)
    np.testing.assert_array_equal(img.pixels, arr)


def test_jpeg_and_grayscale_become_rgb() -> None:
    gray = np.full((6, 4), 128, dtype=np.uint8)
    img = decode_image(encode(gray, "JPEG"))
    assert img.format == "JPEG"
    assert img.pixels.shape == (6, 4, 3)


def test_rgba_png_becomes_rgb() -> None:
    rgba = np.zeros((3, 3, 4), dtype=np.uint8)
    assert decode_image(encode(rgba)).pixels.shape == (3, 3, 3)


NOISY = encode(np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "empty"),
        (b"not an image at all", "cannot identify"),
        (NOISY[: len(NOISY) // 2], "corrupt or truncated"),
    ],
)
def test_bad_bytes_are_invalid_image(data: bytes, needle: str) -> None:
    with pytest.raises(InvalidImageError, match=needle) as info:
        decode_image(data)
    assert not isinstance(info.value, ImageTooLargeError)
    assert http_status(info.value) == 400


def test_other_formats_are_refused_by_name() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    with pytest.raises(InvalidImageError, match="'BMP' is not supported; valid formats: PNG, JPEG"):
        decode_image(buf.getvalue())


def test_wrong_type_is_invalid_image() -> None:
    with pytest.raises(InvalidImageError, match="must be bytes, got str"):
        decode_image("abc")  # type: ignore[arg-type]


def test_byte_cap() -> None:
    data = encode(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ImageTooLargeError, match=f"{len(data)} bytes; the limit is 10 bytes"):
        decode_image(data, ImageLimits(max_bytes=10))


def test_pixel_cap_from_header_before_decoding() -> None:
    # The header claims 5000 x 5000; decoding would fail on the bogus data,
    # so only a header check can produce this error.
    with pytest.raises(
        ImageTooLargeError, match="5000x5000 = 25000000 pixels; the limit is 10000000"
    ) as info:
        decode_image(png_header_only(5000, 5000), ImageLimits(max_pixels=10_000_000))
    assert http_status(info.value) == 413


def test_decompression_bomb_is_too_large_even_with_a_generous_cap() -> None:
    # Above twice Pillow's MAX_IMAGE_PIXELS Pillow itself refuses: still a 413.
    bomb = png_header_only(30000, 30000)
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(bomb, ImageLimits(max_pixels=10**10))


def test_real_compressed_bomb_is_rejected_cheaply() -> None:
    # 6000 x 6000 zeros compress to a few kB but decode to 108 MB.
    big = Image.new("L", (6000, 6000))
    buf = io.BytesIO()
    big.save(buf, format="PNG", optimize=True)
    data = buf.getvalue()
    assert len(data) < 200_000
    with pytest.raises(ImageTooLargeError, match="36000000 pixels"):
        decode_image(data, ImageLimits(max_pixels=1_000_000))


def test_input_transform_resizes_and_normalises() -> None:
    arr = np.full((10, 20, 3), 255, dtype=np.uint8)
    t = InputTransform(size=(8, 6), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = DecodedImage(arr, "PNG")
    x = t(img)
    assert x.shape == (3, 8, 6)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.ones(3, 8, 6))
    assert t.resized(img).shape == (8, 6, 3)

"""Image decoding: formats, caps checked from the header, corrupt data, bombs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms

from camserve.codecs.http import http_status
from camserve.errors import ImageTooLargeError, InvalidImageError
from camserve.service.images import (
    BACKGROUND,
    DecodedImage,
    ImageLimits,
    InputTransform,
    decode_image,
    viewer_rgb,
)


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


# --------------------------------------------------------------------------
# Images as a viewer shows them: bit depths, palettes, alpha, colour keys,
# CMYK, ICC profiles, PNG gamma, EXIF orientation, Pillow modes.


def chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def raw_png(
    samples: np.ndarray, bit_depth: int, color_type: int, extra: tuple[bytes, ...] = ()
) -> bytes:
    """A PNG written byte by byte (Pillow cannot write 2/4-bit gray or 16-bit colour).

    ``samples`` is (H, W, C) integers at ``bit_depth``; ``extra`` are whole
    chunks placed before the image data (tRNS, gAMA...).
    """
    h, w, c = samples.shape
    rows = []
    for row in samples.reshape(h, w * c):
        if bit_depth == 16:
            data = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            data = row.astype(np.uint8).tobytes()
        else:
            bits = np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - bit_depth :]
            data = np.packbits(bits.ravel()).tobytes()
        rows.append(b"\x00" + data)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + b"".join(extra)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def gray_rgb(values: list[int]) -> np.ndarray:
    """The expected (1, W, 3) pixels of a row of gray values."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[None, :, None], 3, axis=2)


def save(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def test_16_bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    data = save(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = decode_image(data)
    # round(v * 255 / 65535): 1000 -> 3.89 -> 4, not 255 (clipped) as before.
    np.testing.assert_array_equal(img.pixels, gray_rgb([0, 1, 4, 128, 255]))


@pytest.mark.parametrize("bit_depth", [1, 2, 4, 8, 16])
def test_every_grayscale_bit_depth_spans_black_to_white(bit_depth: int) -> None:
    top = 2**bit_depth - 1
    levels = sorted({0, top // 3, top // 2, top})
    data = raw_png(np.array(levels).reshape(1, -1, 1), bit_depth, color_type=0)
    expected = [round(v * 255 / top) for v in levels]
    np.testing.assert_array_equal(decode_image(data).pixels, gray_rgb(expected))


def test_16_bit_rgb_png_is_scaled() -> None:
    samples = np.array([[[65535, 32896, 4660], [0, 65535, 257]]])
    img = decode_image(raw_png(samples, 16, color_type=2))
    expected = np.rint(samples * 255 / 65535)
    np.testing.assert_allclose(img.pixels.astype(float), expected, atol=1)


def test_16_bit_rgba_and_gray_alpha_pngs_are_composited_on_white() -> None:
    half = 32896  # alpha 128/255
    rgba = np.array([[[0, 0, 0, 65535], [0, 0, 0, 0], [65535, 0, 0, half]]])
    img = decode_image(raw_png(rgba, 16, color_type=6))
    np.testing.assert_allclose(
        img.pixels.astype(float), [[[0, 0, 0], [255, 255, 255], [255, 127, 127]]], atol=1
    )
    gray_alpha = np.array([[[0, 65535], [0, 0], [0, half]]])
    img = decode_image(raw_png(gray_alpha, 16, color_type=4))
    np.testing.assert_allclose(img.pixels.astype(float), gray_rgb([0, 255, 127]), atol=1)


def test_alpha_is_composited_on_a_white_background() -> None:
    assert BACKGROUND == (255, 255, 255)
    rgba = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [0, 0, 0, 0]]],
        dtype=np.uint8,
    )
    img = decode_image(encode(rgba))
    mixed = np.rint(np.array([200, 100, 50]) * 128 / 255 + 255 * 127 / 255)
    expected = np.array([[[200, 100, 50], [255, 255, 255], mixed, [255, 255, 255]]])
    np.testing.assert_allclose(img.pixels.astype(float), expected, atol=1)


def test_gray_alpha_png() -> None:
    la = np.array([[[100, 255], [100, 0], [0, 128]]], dtype=np.uint8)
    data = save(Image.fromarray(la, mode="LA"))
    assert Image.open(io.BytesIO(data)).mode == "LA"
    np.testing.assert_allclose(
        decode_image(data).pixels.astype(float), gray_rgb([100, 255, 127]), atol=1
    )


def test_palette_png_without_and_with_transparency() -> None:
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.putdata([0, 1, 2])
    opaque = decode_image(save(pal)).pixels
    np.testing.assert_array_equal(opaque, [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    # tRNS gives entry 0 alpha 255, entry 1 alpha 128, entry 2 alpha 0.
    seen = decode_image(save(pal, transparency=bytes([255, 128, 0]))).pixels
    np.testing.assert_allclose(
        seen.astype(float), [[[255, 0, 0], [127, 255, 127], [255, 255, 255]]], atol=1
    )
    # A single transparent index.
    seen = decode_image(save(pal, transparency=1)).pixels
    np.testing.assert_array_equal(seen, [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]])


def test_colour_keys_are_transparent() -> None:
    gray = Image.fromarray(np.array([[0, 7, 200]], dtype=np.uint8))
    np.testing.assert_array_equal(
        decode_image(save(gray, transparency=7)).pixels, gray_rgb([0, 255, 200])
    )
    rgb = Image.fromarray(np.array([[[0, 7, 9], [1, 2, 3]]], dtype=np.uint8))
    np.testing.assert_array_equal(
        decode_image(save(rgb, transparency=(0, 7, 9))).pixels, [[[255, 255, 255], [1, 2, 3]]]
    )
    # A 16-bit key (Pillow's own conversion ignores it).
    deep = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(
        decode_image(save(deep, transparency=1000)).pixels, gray_rgb([0, 255, 255])
    )
    deep_values = raw_png(np.array([[[0], [1000], [32896]]]), 16, 0, (chunk(b"tRNS", b"\x00\x00"),))
    np.testing.assert_array_equal(decode_image(deep_values).pixels, gray_rgb([255, 4, 128]))


@pytest.mark.parametrize("bit_depth", [1, 2, 4])
def test_colour_keys_of_low_bit_depth_gray(bit_depth: int) -> None:
    top = 2**bit_depth - 1
    levels = sorted({0, 1, top})
    data = raw_png(np.array(levels).reshape(1, -1, 1), bit_depth, 0, (chunk(b"tRNS", b"\x00\x01"),))
    expected = [255 if v == 1 else round(v * 255 / top) for v in levels]
    np.testing.assert_array_equal(decode_image(data).pixels, gray_rgb(expected))


def test_colour_key_of_16_bit_rgb_is_matched_on_the_high_byte() -> None:
    samples = np.array([[[0, 0x1234, 0xFFFF], [0x8000, 0x8000, 0x8000], [0, 0x1200, 0xFF00]]])
    key = chunk(b"tRNS", struct.pack(">HHH", 0, 0x1234, 0xFFFF))
    img = decode_image(raw_png(samples, 16, 2, (key,)))
    np.testing.assert_array_equal(img.pixels, [[[255, 255, 255], [128, 128, 128], [255, 255, 255]]])


def test_one_bit_png() -> None:
    bits = Image.fromarray(np.array([[0, 255, 0, 255]], dtype=np.uint8)).convert("1")
    data = save(bits)
    assert Image.open(io.BytesIO(data)).mode == "1"
    np.testing.assert_array_equal(decode_image(data).pixels, gray_rgb([0, 255, 0, 255]))


def test_progressive_jpeg() -> None:
    data = save(Image.new("RGB", (24, 16), (30, 140, 220)), "JPEG", quality=95, progressive=True)
    assert Image.open(io.BytesIO(data)).info.get("progressive") == 1
    img = decode_image(data)
    np.testing.assert_allclose(
        img.pixels.reshape(-1, 3).astype(float), [[30, 140, 220]] * 384, atol=3
    )


def test_grayscale_jpeg_is_gray_rgb() -> None:
    img = decode_image(encode(np.full((16, 16), 90, dtype=np.uint8), "JPEG"))
    np.testing.assert_allclose(img.pixels.astype(float), 90, atol=1)


@pytest.mark.parametrize(
    "cmyk, rgb",
    [
        ((255, 0, 0, 0), (0, 255, 255)),  # cyan
        ((0, 255, 0, 0), (255, 0, 255)),  # magenta
        ((0, 0, 255, 0), (255, 255, 0)),  # yellow
        ((0, 0, 0, 255), (0, 0, 0)),  # black
        ((0, 0, 0, 0), (255, 255, 255)),  # paper
        ((0, 0, 0, 128), (127, 127, 127)),  # half black
    ],
)
def test_cmyk_jpeg(cmyk: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    data = save(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "CMYK" and "adobe" in opened.info  # Adobe-inverted CMYK
    img = decode_image(data)
    assert img.format == "JPEG" and img.pixels.shape == (16, 16, 3)
    np.testing.assert_allclose(img.pixels.reshape(-1, 3).astype(float), [rgb] * 256, atol=3)


ORIENTED = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (1, ORIENTED),
        (2, ORIENTED[:, ::-1]),  # mirrored left-right
        (3, ORIENTED[::-1, ::-1]),  # rotated 180
        (4, ORIENTED[::-1]),  # mirrored top-bottom
        (5, ORIENTED.transpose(1, 0, 2)),  # transposed
        (6, np.rot90(ORIENTED, k=-1)),  # stored rotated 90 counter-clockwise: turn clockwise
        (7, np.rot90(ORIENTED, k=2).transpose(1, 0, 2)),  # transverse
        (8, np.rot90(ORIENTED, k=1)),  # turn counter-clockwise
    ],
)
def test_exif_orientation_turns_the_image_upright(orientation: int, upright: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode_image(save(Image.fromarray(ORIENTED), exif=exif))
    assert img.size == (upright.shape[1], upright.shape[0])
    np.testing.assert_array_equal(img.pixels, upright)


def test_exif_orientation_of_a_jpeg() -> None:
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = (255, 0, 0)  # left half red
    stored[:, 16:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view: left becomes top
    img = decode_image(save(Image.fromarray(stored), "JPEG", quality=95, exif=exif))
    assert img.size == (16, 32)
    top, bottom = img.pixels[2:14, 2:14], img.pixels[18:30, 2:14]
    np.testing.assert_allclose(top.reshape(-1, 3).astype(float), [[255, 0, 0]] * 144, atol=8)
    np.testing.assert_allclose(bottom.reshape(-1, 3).astype(float), [[0, 0, 255]] * 144, atol=8)


def srgb_profile_bytes() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def swapped_primaries_profile() -> bytes:
    """sRGB built with ImageCms, with the red and blue colorants exchanged.

    A file with this profile stores blue in its first channel and red in its
    third: the stored (255, 0, 0) is sRGB blue.
    """
    icc = bytearray(srgb_profile_bytes())
    (count,) = struct.unpack(">I", icc[128:132])
    entries = {bytes(icc[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    icc[red + 4 : red + 12], icc[blue + 4 : blue + 12] = (
        icc[blue + 4 : blue + 12],
        icc[red + 4 : red + 12],
    )
    icc[84:100] = bytes(16)  # no profile id: the checksum would no longer match
    return bytes(icc)


STORED = np.array([[[255, 0, 0], [10, 200, 30], [128, 128, 128], [0, 0, 255]]], dtype=np.uint8)


def test_icc_profile_is_converted_to_srgb() -> None:
    data = save(Image.fromarray(STORED), icc_profile=swapped_primaries_profile())
    img = decode_image(data)
    np.testing.assert_allclose(img.pixels.astype(float), STORED[..., ::-1].astype(float), atol=1)


def test_icc_profile_of_a_jpeg_is_converted_to_srgb() -> None:
    stored = np.zeros((16, 16, 3), dtype=np.uint8)
    stored[...] = (230, 40, 20)
    data = save(
        Image.fromarray(stored), "JPEG", quality=95, icc_profile=swapped_primaries_profile()
    )
    img = decode_image(data)
    np.testing.assert_allclose(
        img.pixels.reshape(-1, 3).astype(float), [[20, 40, 230]] * 256, atol=4
    )


def test_srgb_profile_keeps_the_pixels() -> None:
    data = save(Image.fromarray(STORED), icc_profile=srgb_profile_bytes())
    np.testing.assert_allclose(
        decode_image(data).pixels.astype(float), STORED.astype(float), atol=1
    )


def test_icc_profile_on_an_image_with_alpha() -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [255, 0, 0, 128]]], dtype=np.uint8)
    img = decode_image(save(Image.fromarray(rgba), icc_profile=swapped_primaries_profile()))
    np.testing.assert_allclose(
        img.pixels.astype(float), [[[0, 0, 255], [255, 255, 255], [127, 127, 255]]], atol=1
    )


@pytest.mark.parametrize("profile", [b"not an ICC profile", None])
def test_unusable_icc_profiles_are_ignored_as_viewers_do(profile: bytes | None) -> None:
    if profile is None:  # an RGB profile on a grayscale image: channels do not fit
        gray = np.array([[0, 90, 255]], dtype=np.uint8)
        data = save(Image.fromarray(gray), icc_profile=srgb_profile_bytes())
        np.testing.assert_array_equal(decode_image(data).pixels, gray_rgb([0, 90, 255]))
    else:
        data = save(Image.fromarray(STORED), icc_profile=profile)
        np.testing.assert_array_equal(decode_image(data).pixels, STORED)


def png_with_chunks(values: list[int], *chunks: bytes) -> bytes:
    return raw_png(np.array(values).reshape(1, -1, 1), 8, color_type=0, extra=chunks)


def test_png_gamma_is_applied_without_a_profile() -> None:
    values = [0, 64, 128, 255]
    linear = chunk(b"gAMA", struct.pack(">I", 100000))  # samples are linear light
    expected = [round(255 * (v / 255) ** (1 / 2.2)) for v in values]  # [0, 136, 186, 255]
    np.testing.assert_array_equal(
        decode_image(png_with_chunks(values, linear)).pixels, gray_rgb(expected)
    )
    # The sRGB display gamma (45455 / 100000) changes nothing.
    srgb_gamma = chunk(b"gAMA", struct.pack(">I", 45455))
    np.testing.assert_array_equal(
        decode_image(png_with_chunks(values, srgb_gamma)).pixels, gray_rgb(values)
    )
    # An sRGB chunk overrides gAMA (PNG 1.2, section 11.3.3.5).
    srgb = chunk(b"sRGB", b"\x00")
    np.testing.assert_array_equal(
        decode_image(png_with_chunks(values, srgb, linear)).pixels, gray_rgb(values)
    )


def test_jpeg_with_a_multi_picture_index_is_a_jpeg() -> None:
    first = Image.new("RGB", (8, 8), (10, 200, 30))
    data = save(first, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    img = decode_image(data)
    assert img.format == "JPEG"
    np.testing.assert_allclose(
        img.pixels.reshape(-1, 3).astype(float), [[10, 200, 30]] * 64, atol=3
    )


def test_integer_and_float_modes() -> None:
    # Mode I (32-bit integers: 16-bit samples) and F (floats in [0, 1]) have no
    # PNG or JPEG encoding of their own; they are scaled, not clipped at 255.
    ints = Image.fromarray(np.array([[0, 1000, 65535, 70000, -5]], dtype=np.int32))
    assert ints.mode == "I"
    np.testing.assert_array_equal(viewer_rgb(ints), gray_rgb([0, 4, 255, 255, 0]))
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32))
    assert floats.mode == "F"
    np.testing.assert_array_equal(viewer_rgb(floats), gray_rgb([0, 128, 255, 255, 0]))
    bad = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32))
    with pytest.raises(InvalidImageError, match="NaN or infinite"):
        viewer_rgb(bad)


def test_premultiplied_alpha_modes() -> None:
    # Premultiplied (100, 50, 0) at alpha 128 over white: c + 255 * (1 - a).
    rgba = Image.frombytes("RGBa", (1, 1), bytes([100, 50, 0, 128]))
    np.testing.assert_allclose(viewer_rgb(rgba).astype(float), [[[227, 177, 127]]], atol=2)
    la = Image.frombytes("La", (1, 1), bytes([100, 128]))
    np.testing.assert_allclose(viewer_rgb(la).astype(float), [[[227, 227, 227]]], atol=2)


def test_other_modes_become_rgb() -> None:
    ycc = Image.new("YCbCr", (2, 1), (128, 128, 128))
    np.testing.assert_allclose(viewer_rgb(ycc).astype(float), 128, atol=1)
    hsv = Image.new("HSV", (1, 1), (0, 255, 255))
    np.testing.assert_array_equal(viewer_rgb(hsv), [[[255, 0, 0]]])


def jpeg_with_exif_payload(payload: bytes) -> bytes:
    """A 16 x 8 JPEG (left half red) whose APP1 segment is ``Exif\\0\\0`` + ``payload``."""
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, :8] = (255, 0, 0)
    plain = save(Image.fromarray(stored), "JPEG", quality=95)
    segment = b"Exif\x00\x00" + payload
    app1 = b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    return plain[:2] + app1 + plain[2:]


def exif_payload(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "camera"
    exif[0x011A] = 72.0  # XResolution, a RATIONAL
    return bytes(exif.tobytes())


def test_corrupt_exif_blocks_are_ignored_as_viewers_do() -> None:
    truncated = decode_image(jpeg_with_exif_payload(b"MM\x00*\x00\x00\x00\x08\x00\x05\x01"))
    assert truncated.size == (16, 8)
    upright = decode_image(jpeg_with_exif_payload(exif_payload(6)))
    assert upright.size == (8, 16)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.data())
def test_any_corruption_of_the_exif_block_decodes_or_is_invalid(data: st.DataObject) -> None:
    payload = bytearray(exif_payload(6))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    try:
        img = decode_image(jpeg_with_exif_payload(bytes(payload)))
    except InvalidImageError:
        return
    assert img.size in {(16, 8), (8, 16)}
    assert img.pixels.dtype == np.uint8

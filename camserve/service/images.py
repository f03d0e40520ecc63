"""Image decoding with byte and pixel caps, and the model-input transform.

The pixel cap is checked from the image header (``Image.open`` reads only the
header) before any pixel data is decoded, so a decompression bomb costs a few
hundred bytes of parsing, not gigabytes of memory. Pillow's own bomb guard
(:class:`PIL.Image.DecompressionBombError`) is mapped to the same error.

Decoding gives the picture an image viewer shows, as 8-bit sRGB: every bit
depth scaled to 0-255 (1, 2, 4, 8 and 16 bits per sample), palettes looked up,
transparency (alpha channel, palette alpha, PNG colour keys) composited on
:data:`BACKGROUND` (white), embedded ICC colour profiles converted to sRGB with
LittleCMS (:mod:`PIL.ImageCms`), the PNG ``gAMA`` gamma applied when the file
has neither an ICC profile nor an ``sRGB`` chunk, CMYK JPEGs (Adobe inverted
ones included) converted, and the EXIF orientation applied
(:func:`PIL.ImageOps.exif_transpose`), so a photo taken with the camera on its
side is upright.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from camserve.errors import ImageTooLargeError, InvalidImageError

__all__ = [
    "BACKGROUND",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageLimits",
    "InputTransform",
    "decode_image",
    "viewer_rgb",
]

DEFAULT_MAX_BYTES = 6_000_000
"""Largest encoded image accepted (below TorchServe's 6,553,500-byte request cap)."""
DEFAULT_MAX_PIXELS = 16_000_000
"""Largest decoded image accepted, in pixels (width x height)."""
BACKGROUND = (255, 255, 255)
"""sRGB colour that transparent pixels are composited on (white, as most viewers show them)."""

_FORMATS = ("PNG", "JPEG")
# Pillow reports JPEG files carrying a multi-picture (MPF) index, as many cameras
# write them, as "MPO"; the first picture is the JPEG that viewers show.
_ALIASES = {"MPO": "JPEG"}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_SRGB_GAMMA = 1.0 / 2.2
"""The gamma of a display that a PNG ``gAMA`` value is corrected for (sRGB's, approximately)."""


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied to every incoming image."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DecodedImage:
    """A decoded RGB image: ``pixels`` is uint8 (H, W, 3), sRGB, as a viewer shows it."""

    pixels: np.ndarray
    format: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image as shown (after the EXIF orientation)."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


def decode_image(data: bytes, limits: ImageLimits | None = None) -> DecodedImage:
    """Decodes a PNG or JPEG image into the RGB pixels a viewer shows, enforcing the caps.

    See :func:`viewer_rgb` for what "as a viewer shows it" covers.

    Args:
        data: the encoded image.
        limits: byte and pixel caps (defaults: :class:`ImageLimits`).

    Returns:
        The pixels, uint8 ``(H, W, 3)`` sRGB, upright, and the format
        (``"PNG"`` or ``"JPEG"``).

    Raises:
        ImageTooLargeError: more bytes or pixels than the caps allow, or a
            decompression bomb.
        InvalidImageError: empty, truncated, corrupt, or not PNG/JPEG.
    """
    limits = limits or ImageLimits()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidImageError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            # Our own cap (below) decides; Pillow's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow's EXIF (TIFF) reader warns about corrupt EXIF blocks; they are
            # ignored (see _oriented), not reported.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
            with Image.open(io.BytesIO(bytes(data))) as img:
                fmt = _ALIASES.get(str(img.format), str(img.format))
                if fmt not in _FORMATS:
                    raise InvalidImageError(
                        f"image format {img.format!r} is not supported; "
                        f"valid formats: {', '.join(_FORMATS)}"
                    )
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise InvalidImageError(f"image has no pixels ({width}x{height})")
                if width * height > limits.max_pixels:
                    raise ImageTooLargeError(
                        f"image is {width}x{height} = {width * height} pixels; "
                        f"the limit is {limits.max_pixels} pixels"
                    )
                img.load()
                if fmt == "PNG":
                    _png_key_as_decoded(img, bytes(data[:26]))
                pixels = viewer_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"cannot identify the image ({len(data)} bytes); valid formats: {', '.join(_FORMATS)}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InvalidImageError):
            raise
        raise InvalidImageError(f"image is corrupt or truncated: {exc}") from exc
    return DecodedImage(pixels=pixels, format=fmt)


def _png_key_as_decoded(image: Image.Image, head: bytes) -> None:
    """Rescales a PNG colour key (``tRNS``) to the samples Pillow decoded.

    Pillow scales 2- and 4-bit gray samples to 0-255 and keeps the high byte of
    16-bit colour samples, but reports the key at the file's bit depth. The bit
    depth and colour type are bytes 24 and 25 of every PNG (the IHDR chunk comes
    first). A 16-bit colour key is matched on its high byte: pixels within
    1/256 of the key colour count as the key.
    """
    key = image.info.get("transparency")
    if len(head) < 26 or key is None:
        return
    bit_depth, color_type = head[24], head[25]
    if color_type == 0 and bit_depth in (2, 4) and isinstance(key, int):
        image.info["transparency"] = key * 255 // (2**bit_depth - 1)
    elif color_type == 2 and bit_depth == 16 and isinstance(key, tuple):
        image.info["transparency"] = tuple(int(v) >> 8 for v in key)


def viewer_rgb(image: Image.Image) -> NDArray[np.uint8]:
    """The picture an image viewer shows for a decoded Pillow image, as 8-bit sRGB.

    In order:

    1. EXIF orientation (tag 274, values 2-8) applied with
       :func:`PIL.ImageOps.exif_transpose`.
    2. Samples scaled to 8 bits: 1/2/4-bit samples by Pillow's decoder;
       16-bit colour and gray-alpha samples by Pillow's decoder to their high
       byte (within one level of ``round(v * 255 / 65535)``); 16-bit
       grayscale (modes ``I;16*``) and 32-bit integer (``I``, whose only PNG
       source is 16-bit samples) as ``round(v * 255 / 65535)``, clipped to
       [0, 65535] first; float (``F``) as ``round(v * 255)`` of values
       clipped to [0, 1]. Palettes (``P``, ``PA``) are looked up.
    3. Transparency separated as an alpha channel: ``LA``, ``RGBA``,
       premultiplied ``La``/``RGBa``, palette alpha (PNG ``tRNS``) and PNG
       colour keys (``tRNS`` in gray images of every bit depth and in RGB
       images; :func:`decode_image` matches a 16-bit RGB key on its high byte).
    4. Colour: an embedded ICC profile (``icc_profile``) converts the colour
       channels (gray, RGB or CMYK) to sRGB, perceptual intent. A profile
       LittleCMS cannot read, or one that does not fit the image's channels,
       is ignored, as browsers do. Without a profile: CMYK becomes RGB as
       ``(255 - C) * (255 - K) / 255`` per channel (Pillow), gray is repeated
       in R, G and B, and a PNG ``gAMA`` value ``g`` without an ``sRGB`` chunk
       maps samples ``s`` in [0, 1] to ``s ** (1 / (g * 2.2))`` (PNG 1.2
       section 10.5 for a 2.2-gamma display; no change for ``g = 1/2.2``).
    5. Alpha composited on :data:`BACKGROUND` (white): ``c * a + bg * (1 - a)``.

    Args:
        image: a decoded (loaded) Pillow image of any mode.

    Returns:
        uint8 ``(H, W, 3)`` sRGB pixels; ``(H, W)`` are those of the oriented image.

    Raises:
        InvalidImageError: a float (``F``) image with NaN or infinite samples,
            or a mode with no RGB meaning (Pillow cannot convert it).
    """
    image = _oriented(image)
    info = dict(image.info)
    color, alpha = _color_and_alpha(image)
    rgb = _srgb(color, info)
    if alpha is not None and alpha.getextrema() != (255, 255):
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, BACKGROUND), alpha)
    return np.asarray(rgb, dtype=np.uint8).copy()


# What Pillow raises on EXIF blocks it cannot parse or write back.
_EXIF_ERRORS = (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError, struct.error)
# EXIF orientation -> the transposition that shows the image upright (EXIF 2.3, tag 274).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _oriented(image: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation (a no-op without one).

    An EXIF block Pillow cannot parse counts as absent, as in viewers; one whose
    other tags Pillow cannot write back still gives its orientation.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _EXIF_ERRORS:
        return image
    if orientation not in _UPRIGHT:
        return image
    try:
        upright = ImageOps.exif_transpose(image)
    except _EXIF_ERRORS:
        upright = image.transpose(_UPRIGHT[orientation])
    return image if upright is None else upright


def _color_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Splits an image into 8-bit colour (``L``, ``RGB`` or ``CMYK``) and alpha (``L``) or None."""
    mode = image.mode
    key = image.info.get("transparency")
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _gray8(image, key)
    if mode in ("P", "PA"):
        palette_alpha = image.palette is not None and image.palette.mode == "RGBA"
        has_alpha = mode == "PA" or key is not None or palette_alpha
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode == "1":
        image = image.convert("L")
        if key is not None:
            image.info["transparency"] = 255 if key else 0
    elif mode in ("La", "RGBa"):
        image = image.convert("LA" if mode == "La" else "RGBA")
    if image.mode in ("L", "RGB") and image.info.get("transparency") is not None:
        image = image.convert("LA" if image.mode == "L" else "RGBA")
    if image.mode in ("LA", "RGBA"):
        return image.convert(image.mode[:-1]), image.getchannel("A")
    if image.mode in ("L", "RGB", "CMYK"):
        return image, None
    try:
        return image.convert("RGB"), None
    except ValueError as exc:
        raise InvalidImageError(f"image mode {mode!r} has no RGB meaning: {exc}") from exc


def _gray8(image: Image.Image, key: object) -> tuple[Image.Image, Image.Image | None]:
    """16-bit, 32-bit integer or float gray scaled (not clipped) to 8 bits, and a key's alpha."""
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise InvalidImageError("image has NaN or infinite samples")
        scaled = np.clip(values, 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(values.astype(np.float32), 0.0, 65535.0) * np.float32(255.0 / 65535.0)
    gray = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    alpha = None
    if isinstance(key, int) and image.mode != "F":
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), mode="L")
    return gray, alpha


def _srgb(color: Image.Image, info: dict[str | tuple[int, int], Any]) -> Image.Image:
    """8-bit ``L``/``RGB``/``CMYK`` colour as sRGB ``RGB``: ICC profile, else gAMA, else as is."""
    profile = info.get("icc_profile")
    if isinstance(profile, bytes) and profile:
        transform = _to_srgb_transform(profile, color.mode)
        if transform is _IDENTITY:
            return color
        if isinstance(transform, ImageCms.ImageCmsTransform):
            converted = ImageCms.applyTransform(color, transform)
            if converted is not None:
                return converted
    rgb = color if color.mode == "RGB" else color.convert("RGB")
    gamma = info.get("gamma")
    if (
        not profile
        and "srgb" not in info
        and isinstance(gamma, int | float)
        and gamma > 0
        and abs(gamma - _SRGB_GAMMA) > 1e-3
    ):
        exponent = 1.0 / (float(gamma) * 2.2)
        lut = np.rint(255.0 * (np.arange(256) / 255.0) ** exponent).astype(np.uint8)
        rgb = rgb.point(lut.tolist() * 3)
    return rgb


def _rgb_cube() -> Image.Image:
    """Every 8-bit RGB colour on a 16-step grid plus the full gray ramp, as one image row."""
    steps = np.append(np.arange(0, 256, 16), 255)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    ramp = np.repeat(np.arange(256)[:, None], 3, axis=1)
    return Image.fromarray(np.concatenate([grid, ramp]).astype(np.uint8)[None], mode="RGB")


_IDENTITY = object()
"""Marks a profile whose conversion to sRGB changes no colour by more than one level."""
_CUBE = _rgb_cube()


@lru_cache(maxsize=8)
def _to_srgb_transform(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | object | None:
    """A LittleCMS transform from an embedded profile to sRGB.

    Returns :data:`_IDENTITY` for an RGB profile that is sRGB in effect (every
    colour of a 17-level RGB grid and the gray ramp within one level after
    conversion: most photos embed such a profile, and skipping it saves a full
    pass over the pixels), or None when the profile cannot be used.
    """
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        transform = ImageCms.buildTransform(
            source, _SRGB, mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
        )
        if mode == "RGB":
            converted = ImageCms.applyTransform(_CUBE, transform)
            if converted is not None:
                change = np.abs(np.asarray(converted, np.int16) - np.asarray(_CUBE, np.int16))
                if int(change.max()) <= 1:
                    return _IDENTITY
        return transform
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class InputTransform:
    """Resizes an image to the model's input size and normalises it.

    Attributes:
        size: (height, width) the model expects.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def resized(self, image: DecodedImage) -> np.ndarray:
        """The image resized (bilinear) to the model input size, uint8 (H, W, 3)."""
        h, w = self.size
        if image.pixels.shape[:2] == (h, w):
            return image.pixels
        pil = Image.fromarray(image.pixels)
        return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)

    @cached_property
    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return mean, std

    def normalize(self, resized: np.ndarray) -> torch.Tensor:
        """The model input from an image already resized by :meth:`resized`: float32 (3, H, W)."""
        arr = resized.astype(np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        mean, std = self._mean_std
        return (x - mean) / std

    def __call__(self, image: DecodedImage) -> torch.Tensor:
        """The model input for one image: float32 (3, H, W)."""
        return self.normalize(self.resized(image))

"""Image decoding with byte and pixel caps, and the model-input transform.

The pixel cap is checked from the image header (``Image.open`` reads only the
header) before any pixel data is decoded, so a decompression bomb costs a few
hundred bytes of parsing, not gigabytes of memory. Pillow's own bomb guard
(:class:`PIL.Image.DecompressionBombError`) is mapped to the same error.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from camserve.errors import ImageTooLargeError, InvalidImageError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageLimits",
    "InputTransform",
    "decode_image",
]

DEFAULT_MAX_BYTES = 6_000_000
"""Largest encoded image accepted (below TorchServe's 6,553,500-byte request cap)."""
DEFAULT_MAX_PIXELS = 16_000_000
"""Largest decoded image accepted, in pixels (width x height)."""

_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied to every incoming image."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DecodedImage:
    """A decoded RGB image: ``pixels`` is uint8 (H, W, 3)."""

    pixels: np.ndarray
    format: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the original image."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


def decode_image(data: bytes, limits: ImageLimits | None = None) -> DecodedImage:
    """Decodes a PNG or JPEG image into RGB pixels, enforcing the caps.

    Args:
        data: the encoded image.
        limits: byte and pixel caps (defaults: :class:`ImageLimits`).

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
            with Image.open(io.BytesIO(bytes(data))) as img:
                if img.format not in _FORMATS:
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
                fmt = str(img.format)
                rgb = img.convert("RGB")
                pixels = np.asarray(rgb, dtype=np.uint8).copy()
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

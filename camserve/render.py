"""Turning maps into what people look at: normalised maps, boxes, colours, overlays.

Shared by the JSON codec, the command line and the audit report. Normalising and
upsampling are the engine's (:mod:`camserve.engine.maps`); connected components
come from :func:`scipy.ndimage.label` and colour maps from matplotlib.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from camserve.engine.maps import normalize, upsample
from camserve.errors import InvalidRequestError

__all__ = [
    "DEFAULT_COLORMAP",
    "colorize",
    "localization_box",
    "normalize",
    "overlay",
    "overlay_png",
    "scale_box",
    "upsample",
]

DEFAULT_COLORMAP = "jet"
"""The colour map of heat maps (Grad-CAM's figures use jet)."""

Box = tuple[int, int, int, int]


def _array(map2d: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(map2d, torch.Tensor):
        return map2d.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(map2d)
    return arr if arr.dtype.kind == "f" else arr.astype(np.float32)  # float64 stays exact


def localization_box(map2d: torch.Tensor | np.ndarray, threshold: float = 0.15) -> Box:
    """Bounding box of the largest connected region above ``threshold * max`` (003 eq. 3).

    Regions are 4-connected (:func:`scipy.ndimage.label`'s default structure);
    ties go to the region whose first pixel comes first in row-major order.
    Measured (``timeit`` over 100 upsampled random 7 x 7 and 16 x 16 maps,
    threshold 0.15, one shared CPU core; both gave identical boxes): 64 x 64 maps
    93 us with scipy vs 156 us with a hand-written run-length union-find;
    224 x 224 maps 0.6 ms vs 8.3 ms. So scipy it is, the one box of camserve.

    Args:
        map2d: ``(H, W)`` float map, usually normalised and upsampled.
        threshold: fraction of the map's maximum, in [0, 1] (003 uses 0.15).

    Returns:
        ``(x0, y0, x1, y1)`` inclusive pixel coordinates; the whole map when it
        has no positive (finite) value.

    Raises:
        InvalidRequestError: a map that is not 2-D, or a threshold outside [0, 1].
    """
    m = _array(map2d)
    if m.ndim != 2:
        raise InvalidRequestError(f"map2d must be (H, W), got shape {m.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequestError(f"threshold must be in [0, 1], got {threshold}")
    h, w = m.shape
    m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(m.max()) if m.size else 0.0
    if top <= 0.0:
        return (0, 0, w - 1, h - 1)
    labels, count = ndimage.label(m >= threshold * top)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    best = int(np.argmax(sizes[1:])) + 1  # the first of equal sizes: first in row-major order
    rows, cols = ndimage.find_objects(labels)[best - 1]
    return (int(cols.start), int(rows.start), int(cols.stop) - 1, int(rows.stop) - 1)


def scale_box(box: Sequence[int], input_size: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """Maps an inclusive ``(x0, y0, x1, y1)`` box from the model input to the caller's image.

    Args:
        box: the box in model-input pixels.
        input_size: ``(height, width)`` of the model input.
        image_size: ``(width, height)`` of the caller's image.

    Returns:
        The box in image pixels, covering every image pixel the input box covers.
    """
    in_h, in_w = input_size
    im_w, im_h = image_size
    sx, sy = im_w / in_w, im_h / in_h
    x0, y0, x1, y1 = (int(b) for b in box)
    return (
        int(np.floor(x0 * sx)),
        int(np.floor(y0 * sy)),
        min(im_w - 1, int(np.ceil((x1 + 1) * sx)) - 1),
        min(im_h - 1, int(np.ceil((y1 + 1) * sy)) - 1),
    )


def colorize(values: torch.Tensor | np.ndarray, cmap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` of a map with values in [0, 1] through a matplotlib colour map.

    Raises:
        KeyError: an unknown colour map name.
    """
    v = np.clip(np.nan_to_num(_array(values), nan=0.0), 0.0, 1.0)
    rgba = colormaps[cmap](v, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def overlay(
    normalized: torch.Tensor | np.ndarray,
    image: np.ndarray,
    alpha: float = 0.5,
    cmap: str = DEFAULT_COLORMAP,
) -> np.ndarray:
    """The heat map blended over the image: uint8 ``(H, W, 3)``.

    Args:
        normalized: map in [0, 1] of the image's size ``(H, W)``.
        image: uint8 ``(H, W, 3)``.
        alpha: weight of the heat map.
        cmap: matplotlib colour map name.
    """
    heat = colorize(normalized, cmap).astype(np.float32)
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return np.clip(blend, 0, 255).astype(np.uint8)


def overlay_png(
    normalized: torch.Tensor | np.ndarray,
    image: np.ndarray,
    alpha: float = 0.5,
    cmap: str = DEFAULT_COLORMAP,
) -> bytes:
    """A PNG of :func:`overlay`."""
    buf = io.BytesIO()
    Image.fromarray(overlay(normalized, image, alpha, cmap)).save(buf, format="PNG")
    return buf.getvalue()

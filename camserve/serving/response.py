"""The response side of the wire format: compact JSON with maps as base64.

A map is sent as ``{"shape": [h, w], "dtype": "float32", "data": "<base64 little-endian
float32, row-major>"}`` (``raw``: at the layer's resolution; ``normalized``: min-max
normalised to [0, 1] and upsampled to the model's input size), or as
``{"format": "png", "data": "<base64 PNG>"}`` (a heat-map overlay on the input
image), or not at all (``box``). Every map entry carries ``box``: the
weak-localization box (003 eq. 3) in the caller's image pixels.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from camserve.errors import CamserveError

__all__ = [
    "decode_map",
    "dumps",
    "encode_error",
    "encode_map",
    "overlay_png",
    "scale_box",
    "spliced",
]


class Spliced:
    """A base64 string that :func:`dumps` writes verbatim, without scanning it for escapes.

    Scanning a 22 KB map for characters to escape costs more than the rest of a
    response's JSON; base64 has none. Build one only with :func:`spliced`.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def spliced(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` (from :func:`encode_map`) with its base64 ``data`` marked for :func:`dumps`."""
    data = entry.get("data")
    if isinstance(data, str):
        entry["data"] = Spliced(data)
    return entry


_NONCE = secrets.token_hex(16)
_MARK = json.dumps(_NONCE)


def _plain(obj: Any) -> str:
    if isinstance(obj, Spliced):
        return obj.text
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(payload: Any) -> str:
    """Compact JSON (no spaces; NaN and inf are refused); :class:`Spliced` strings as strings."""
    blobs: list[str] = []

    def mark(obj: Any) -> str:
        if isinstance(obj, Spliced):
            blobs.append(obj.text)
            return _NONCE
        return _plain(obj)

    out = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=mark)
    if not blobs:
        return out
    parts = out.split(_MARK)
    if len(parts) != len(blobs) + 1:  # the random marker also occurs in the payload's text
        return json.dumps(payload, separators=(",", ":"), allow_nan=False, default=_plain)
    pieces = [parts[0]]
    for blob, part in zip(blobs, parts[1:], strict=True):
        pieces += ['"', blob, '"', part]
    return "".join(pieces)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _float_map(m: torch.Tensor) -> dict[str, Any]:
    arr = m.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"shape": list(arr.shape), "dtype": "float32", "data": _b64(arr.tobytes())}


def decode_map(entry: Mapping[str, Any]) -> np.ndarray:
    """Inverse of the float32 encoding: the map as a NumPy array (for clients and tests)."""
    raw = base64.b64decode(entry["data"])
    return np.frombuffer(raw, dtype="<f4").reshape(entry["shape"])


def _colormap(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map of values in [0, 1] to uint8 RGB."""
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0).astype(np.uint8)


def overlay_png(normalized: torch.Tensor, image: np.ndarray, alpha: float = 0.5) -> bytes:
    """A PNG of the map (in [0, 1], the image's size) blended over the image (uint8 H, W, 3)."""
    v = normalized.detach().to("cpu", torch.float32).clamp(0.0, 1.0).numpy()
    heat = _colormap(v).astype(np.float32)
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    buf = io.BytesIO()
    Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def scale_box(
    box: Sequence[int], input_size: tuple[int, int], image_size: tuple[int, int]
) -> list[int]:
    """Maps an inclusive (x0, y0, x1, y1) box from the model input (h, w) to the image (w, h)."""
    in_h, in_w = input_size
    im_w, im_h = image_size
    sx, sy = im_w / in_w, im_h / in_h
    x0, y0, x1, y1 = (int(b) for b in box)
    return [
        int(np.floor(x0 * sx)),
        int(np.floor(y0 * sy)),
        min(im_w - 1, int(np.ceil((x1 + 1) * sx)) - 1),
        min(im_h - 1, int(np.ceil((y1 + 1) * sy)) - 1),
    ]


def encode_map(
    output: str,
    raw: torch.Tensor,
    normalized: torch.Tensor,
    box: list[int],
    image: np.ndarray | None = None,
) -> dict[str, Any]:
    """One map entry of the response.

    Args:
        output: ``raw``, ``normalized``, ``png`` or ``box``.
        raw: the raw map at the layer's resolution (h, w).
        normalized: the min-max normalised map at the input size (H, W).
        box: the weak-localization box in the caller's image pixels.
        image: the resized input image (H, W, 3) uint8, for ``png``.
    """
    if output == "raw":
        entry = _float_map(raw)
    elif output == "normalized":
        entry = _float_map(normalized)
    elif output == "png":
        if image is None:
            raise ValueError("png output needs the input image")
        entry = {"format": "png", "data": _b64(overlay_png(normalized, image))}
    else:
        entry = {}
    entry["box"] = box
    return entry


def encode_error(error: CamserveError) -> tuple[int, str, str]:
    """(HTTP status, message, JSON body) for a per-item error."""
    status = int(error.http_status)
    message = str(error)
    body = dumps({"error": {"type": type(error).__name__, "status": status, "message": message}})
    return status, message, body

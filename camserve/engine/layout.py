"""Layer outputs that are not ``(N, C, h, w)``: token sequences and channels-last maps.

The maps of the Grad-CAM family are computed on activations ``(N, C, h, w)``.
A vision transformer's token layer gives ``(N, T, C)`` (ViT/DeiT: class and
distillation tokens first, then the ``h x w`` patch grid in row-major order;
register tokens likewise), a Swin stage ``(N, h, w, C)`` (channels last) or
``(N, h * w, C)``. A :class:`Layout` turns a layer's output into
``(N, C, h, w)`` by selecting and rearranging elements only (no arithmetic),
so the same rearrangement applied to the gradients gives the gradients of the
rearranged activations, and its inverse puts ablated activations back into the
layer's own layout for Ablation-CAM.

Layouts (``Explainer(..., layout=...)``, one for all layers or one per layer):

- ``"auto"`` (default): 4-D outputs are channels first when their last two
  dimensions have the input's aspect ratio, channels last when only the middle
  two have it, channels first otherwise; 3-D outputs are tokens
  (:class:`TokenGrid` with the prefix detected).
- ``"channels_first"`` ``(N, C, h, w)``; ``"channels_last"`` ``(N, h, w, C)``.
- :class:`TokenGrid` ``(N, T, C)``, ``T = prefix + h * w``: the prefix tokens
  are dropped, the rest is the grid.
- any callable ``f(raw (B, ...)) -> (B, C, h, w)`` that only selects and
  rearranges elements (indexing, ``reshape``, ``permute``, ``transpose``);
  it is checked once per shape by applying it to element indices.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from camserve.errors import InvalidRequestError

__all__ = ["MAX_PREFIX_TOKENS", "LayerView", "Layout", "TokenGrid", "resolve_view"]

MAX_PREFIX_TOKENS = 16
"""Largest number of prefix tokens (class, distillation, register) the detection tries."""


@dataclass(frozen=True)
class TokenGrid:
    """A token layer ``(N, T, C)``: ``prefix`` tokens, then an ``h x w`` grid, row-major.

    Attributes:
        prefix: number of leading non-patch tokens (ViT: 1, DeiT distilled: 2,
            ViT with 4 registers: 5); None detects it: the smallest number
            (at most :data:`MAX_PREFIX_TOKENS`) leaving a grid of the input's
            aspect ratio.
        grid: ``(h, w)``; None derives it from ``T - prefix`` and the input's
            aspect ratio.
    """

    prefix: int | None = None
    grid: tuple[int, int] | None = None


Layout: TypeAlias = (
    Literal["auto", "channels_first", "channels_last"] | TokenGrid | Callable[[Tensor], Tensor]
)


@dataclass(frozen=True)
class LayerView:
    """How one layer's output ``(N, *raw)`` maps to activations ``(N, C, h, w)``.

    Attributes:
        raw_shape: the layer output's shape without the batch dimension.
        shape: ``(C, h, w)``.
        index: LongTensor ``(C * h * w,)``: for each element of the
            activation, its flat position in the layer output; None for the
            identity (channels first).
        description: how the output was read (for messages and notes).
    """

    raw_shape: tuple[int, ...]
    shape: tuple[int, int, int]
    index: Tensor | None
    description: str

    def maps(self, raw: Tensor) -> Tensor:
        """``raw (*lead, *raw_shape)`` -> ``(*lead, C, h, w)``; lead dims are kept (N, or N, K)."""
        if self.index is None:
            return raw
        lead = raw.shape[: raw.dim() - len(self.raw_shape)]
        flat = raw.reshape(*lead, -1)
        idx = self.index.to(raw.device)
        return flat.index_select(flat.dim() - 1, idx).reshape(*lead, *self.shape)

    def restore(self, acts: Tensor, like: Tensor) -> Tensor:
        """Activations ``(B, C, h, w)`` back in the layer's layout, other elements from ``like``.

        Args:
            acts: ``(B, C, h, w)`` activations (e.g. ablated copies).
            like: ``(1, *raw_shape)``, the layer output of the image; elements
                that are not part of the activation (prefix tokens) come from it.
        """
        if self.index is None:
            return acts
        b = acts.shape[0]
        out = like.reshape(1, -1).expand(b, -1).clone()
        out[:, self.index.to(acts.device)] = acts.reshape(b, -1).to(out.dtype)
        return out.reshape(b, *self.raw_shape)


def _fits(h: int, w: int, size: tuple[int, int]) -> bool:
    """A grid ``h x w`` is what an integer stride gives on an input ``H x W``.

    True when some stride ``s`` gives ``h = floor(H / s)`` and ``w = floor(W / s)``,
    or both with ``ceil`` (valid or same padding), so the grid has the input's
    aspect ratio.
    """
    big_h, big_w = size
    if h < 1 or w < 1:
        return False
    lo = max(1, min(big_h // (h + 1), big_w // (w + 1)))
    hi = max(big_h, big_w)
    for s in range(lo, hi + 1):
        if (big_h // s, big_w // s) == (h, w) or (-(-big_h // s), -(-big_w // s)) == (h, w):
            return True
        if -(-big_h // s) < h and -(-big_w // s) < w:
            break
    return False


def _grid(m: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(h, w)`` with ``h * w = m`` closest to the input's aspect ratio, if it fits."""
    best: tuple[float, tuple[int, int]] | None = None
    ratio = math.log(size[0] / size[1])
    for h in range(1, math.isqrt(m) + 1):
        if m % h:
            continue
        for hh, ww in ((h, m // h), (m // h, h)):
            err = abs(math.log(hh / ww) - ratio)
            if _fits(hh, ww, size) and (best is None or err < best[0]):
                best = (err, (hh, ww))
    return None if best is None else best[1]


def _token_view(
    name: str, raw_shape: tuple[int, ...], grid: TokenGrid, size: tuple[int, int]
) -> LayerView:
    t, c = raw_shape
    prefixes = [grid.prefix] if grid.prefix is not None else range(min(t, MAX_PREFIX_TOKENS + 1))
    for p in prefixes:
        if p < 0 or p >= t:
            break
        hw = grid.grid if grid.grid is not None else _grid(t - p, size)
        if hw is None or hw[0] * hw[1] != t - p:
            continue
        h, w = hw
        # element (ch, y, x) of the activation is token p + y * w + x, channel ch
        ch = torch.arange(c)[:, None, None]
        tok = p + torch.arange(h)[None, :, None] * w + torch.arange(w)[None, None, :]
        index = (tok * c + ch).reshape(-1)
        return LayerView(
            raw_shape,
            (c, h, w),
            index,
            f"tokens (N, {t}, {c}): {p} prefix token(s) + a {h} x {w} grid",
        )
    want = (
        f"{grid.prefix} prefix token(s) + a grid {grid.grid or 'of the input aspect ratio'}"
        if grid.prefix is not None
        else f"0..{MAX_PREFIX_TOKENS} prefix tokens + a grid of the input's aspect ratio {size}"
    )
    raise InvalidRequestError(
        f"layer {name!r} outputs tokens (N, {t}, {c}), which are not {want}; pass "
        "layout=TokenGrid(prefix=..., grid=(h, w)) or a reshape callable for this layer"
    )


def _callable_view(
    name: str, raw_shape: tuple[int, ...], fn: Callable[[Tensor], Tensor]
) -> LayerView:
    numel = math.prod(raw_shape)
    if numel >= 2**53:  # pragma: no cover - indices must be exact in float64
        raise InvalidRequestError(f"layer {name!r} output is too large to rearrange")
    probe = torch.arange(numel, dtype=torch.float64).reshape(1, *raw_shape)
    try:
        out = fn(probe)
    except Exception as exc:
        raise InvalidRequestError(
            f"the layout callable for layer {name!r} failed on a tensor of shape "
            f"{(1, *raw_shape)}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InvalidRequestError(
            f"the layout callable for layer {name!r} must return (B, C, h, w), got {shape}"
        )
    flat = out.reshape(-1)
    index = flat.round().long()
    if (
        out.dtype != torch.float64
        or not bool((flat == index.double()).all())
        or bool(((index < 0) | (index >= numel)).any())
        or int(torch.unique(index).numel()) != int(index.numel())
    ):
        raise InvalidRequestError(
            f"the layout callable for layer {name!r} must only select and rearrange elements "
            "(indexing, reshape, permute), each at most once, without arithmetic"
        )
    c, h, w = (int(s) for s in out.shape[1:])
    return LayerView(raw_shape, (c, h, w), index, f"rearranged by {getattr(fn, '__name__', fn)!r}")


def _channels_last_view(raw_shape: tuple[int, ...]) -> LayerView:
    h, w, c = raw_shape
    ch = torch.arange(c)[:, None, None]
    pos = torch.arange(h)[None, :, None] * w + torch.arange(w)[None, None, :]
    index = (pos * c + ch).reshape(-1)
    return LayerView(raw_shape, (c, h, w), index, f"channels last (N, {h}, {w}, {c})")


def _view(
    name: str, raw_shape: tuple[int, ...], layout: Layout, size: tuple[int, int]
) -> LayerView:
    dims = len(raw_shape)
    if isinstance(layout, TokenGrid) or (layout == "auto" and dims == 2):
        grid = layout if isinstance(layout, TokenGrid) else TokenGrid()
        if dims != 2:
            raise InvalidRequestError(
                f"layer {name!r} outputs shape (N, {', '.join(map(str, raw_shape))}), "
                "not tokens (N, T, C)"
            )
        return _token_view(name, raw_shape, grid, size)
    if callable(layout) and not isinstance(layout, str):
        return _callable_view(name, raw_shape, layout)
    if dims != 3:
        raise InvalidRequestError(
            f"layer {name!r} must output a float tensor (N, C, h, w), (N, h, w, C) or tokens "
            f"(N, T, C), got (N, {', '.join(map(str, raw_shape))}); pick a convolutional or "
            "token layer, or pass a layout callable"
        )
    if layout == "channels_last" or (
        layout == "auto"
        and not _fits(raw_shape[1], raw_shape[2], size)
        and _fits(raw_shape[0], raw_shape[1], size)
    ):
        return _channels_last_view(raw_shape)
    c, h, w = raw_shape
    return LayerView(raw_shape, (c, h, w), None, f"channels first (N, {c}, {h}, {w})")


_CACHE_LOCK = threading.Lock()


def resolve_view(
    name: str,
    raw: Tensor,
    layout: Layout,
    size: tuple[int, int],
    cache: dict[tuple[object, ...], LayerView],
) -> LayerView:
    """The :class:`LayerView` of layer ``name`` for an output ``raw (N, ...)`` (cached per shape).

    Args:
        name: the layer's module path (for messages).
        raw: the layer's output.
        layout: see the module docstring.
        size: the input's ``(H, W)``.
        cache: a per-explainer cache.

    Raises:
        InvalidRequestError: an output that is not a float tensor of a
            supported layout, or a layout callable that does arithmetic.
    """
    if not raw.is_floating_point() or raw.dim() < 3:
        raise InvalidRequestError(
            f"layer {name!r} must output a float tensor (N, C, h, w), (N, h, w, C) or tokens "
            f"(N, T, C), got {tuple(raw.shape)} {raw.dtype}"
        )
    key = (name, tuple(raw.shape[1:]), size)
    view = cache.get(key)
    if view is None:
        view = _view(name, tuple(int(s) for s in raw.shape[1:]), layout, size)
        with _CACHE_LOCK:
            cache[key] = view
    return view

"""Perturbation methods: maps that re-run part of the network or all of it.

Every function here is pure: it receives tensors and a callable that the engine
builds (the part of the network after the layer, or the whole network with its
target scores) and knows nothing of hooks or models. Work is batched in chunks
of ``batch_size`` so memory stays bounded, and every division is guarded so that
no NaN or inf leaves a function.

* :func:`ablation_cam`: Ablation-CAM (Desai & Ramaswamy, "Ablation-CAM: Visual
  Explanations for Deep Convolutional Network via Gradient-free Localization",
  WACV 2020), in the paper's ``/S`` form and in the ``/sum(A)`` form of the
  XGrad-CAM analysis (000 sec. 3).
* :func:`score_cam`: Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual
  Explanations for Convolutional Neural Networks", CVPR-W 2020).
* :func:`occlusion`: occlusion maps (Zeiler & Fergus 2014, as used in 001
  sec. 5.1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.engine._numerics import finite
from camserve.engine.methods._checks import check_4d, positive_int, work_dtype
from camserve.errors import InvalidRequestError, UnknownNameError

__all__ = [
    "ABLATION_FORMS",
    "ablation_cam",
    "ablation_drops",
    "occlusion",
    "occlusion_grid",
    "score_cam",
]

#: Valid values of ``ablation_cam(form=...)``.
ABLATION_FORMS = ("score", "sum")

#: Denominators whose magnitude is below this are treated as zero (weight 0).
_EPS = 1e-7

TailFn = Callable[[int, Tensor], Tensor]
ScoreFn = Callable[[int, Tensor], Tensor]


def ablation_drops(
    activations: Tensor,
    scores: Tensor,
    tail: TailFn,
    *,
    batch_size: int = 64,
) -> Tensor:
    """Score drops ``S - S_k`` when each feature map ``A^k`` is zeroed (Ablation-CAM's numerator).

    ``S_k`` is the target score with channel ``k`` of the layer set to zero
    and only the part of the network after the layer re-run (``tail``); these
    are also the drops of the sensitivity axiom (004 eq. 5, 000 sec. 3). The
    ``C`` ablated copies of an image go through ``tail`` in chunks of
    ``batch_size``.

    Args:
        activations: ``(N, C, h, w)`` activations of the layer.
        scores: ``(N, K)`` the unablated target scores ``S``.
        tail: ``tail(i, acts)`` with ``acts`` of shape ``(B, C, h, w)`` returns
            ``(B, K)``: image ``i``'s K target scores when the layer's output is
            replaced by ``acts``.
        batch_size: ablated copies per ``tail`` call.

    Returns:
        ``(N, C, K)`` drops (float32, or float64 for float64 activations).

    Raises:
        InvalidRequestError: bad shapes, a ``tail`` output of the wrong shape,
            or a non-finite score.
    """
    check_4d("activations", activations)
    n, c = activations.shape[:2]
    k = _check_scores("scores", scores, n)
    bs = positive_int("batch_size", batch_size)
    dtype = work_dtype(activations)
    with torch.no_grad():
        acts = activations.detach()
        s = scores.detach().to(device=acts.device, dtype=dtype)
        out = torch.zeros((n, c, k), dtype=dtype, device=acts.device)
        rows = torch.arange(min(bs, c), device=acts.device)
        for i in range(n):
            ablated = torch.empty((c, k), dtype=dtype, device=acts.device)
            # One buffer of copies per image; each chunk zeroes its own diagonal
            # and restores it afterwards, so a chunk writes (B, h, w) values,
            # not (B, C, h, w) (a fresh copy per chunk dominated the run time).
            buffer = acts[i].unsqueeze(0).repeat(min(bs, c), 1, 1, 1)
            for c0 in range(0, c, bs):
                b = min(bs, c - c0)
                batch = buffer[:b]
                diag = (rows[:b], rows[:b] + c0)
                batch[diag] = 0
                version = buffer._version
                ablated[c0 : c0 + b] = _check_output("tail", tail(i, batch), b, k).to(dtype)
                if buffer._version != version:  # the tail wrote into its input (in-place ops)
                    buffer = acts[i].unsqueeze(0).repeat(min(bs, c), 1, 1, 1)
                else:
                    batch[diag] = acts[i, c0 : c0 + b]
            out[i] = s[i].unsqueeze(0) - ablated
    return finite(out)


def ablation_cam(
    activations: Tensor,
    scores: Tensor,
    tail: TailFn,
    *,
    form: str = "score",
    batch_size: int = 64,
) -> Tensor:
    """Ablation-CAM: weight each feature map by the score drop when it is zeroed.

    For image ``i``, target ``c`` and channel ``k``, ``S_k`` is the target score
    when feature map ``A^k`` is set to zero and only the part of the network
    after the layer is re-run (``tail``). The weight is

    * ``form="score"`` (Ablation-CAM paper): ``w_k = (S - S_k) / S``;
    * ``form="sum"`` (000 sec. 3, XGrad-CAM's analysis):
      ``w_k = (S - S_k) / sum_xy A^k``. On a GAP + linear head
      ``S - S_k = W_ck mean(A^k)``, so this form is CAM divided by ``Z = h*w``.

    The map is ``ReLU(sum_k w_k A^k)``. A weight whose denominator is (nearly)
    zero (``|S| < 1e-7``, or a channel whose activations sum to ``|.| < 1e-7``)
    is set to 0, so a target with ``S = 0`` gets an all-zero map in the
    ``"score"`` form. The ``C`` ablated copies of an image go through ``tail``
    in chunks of ``batch_size``.

    Args:
        activations: ``(N, C, h, w)`` activations of the layer.
        scores: ``(N, K)`` the unablated target scores ``S``.
        tail: ``tail(i, acts)`` with ``acts`` of shape ``(B, C, h, w)`` returns
            ``(B, K)``: image ``i``'s K target scores when the layer's output is
            replaced by ``acts``.
        form: ``"score"`` or ``"sum"`` (see above).
        batch_size: ablated copies per ``tail`` call.

    Returns:
        ``(N, K, h, w)`` maps (float32, or float64 for float64 activations).
    """
    check_4d("activations", activations)
    n, _, h, w = activations.shape
    if form not in ABLATION_FORMS:
        raise UnknownNameError("form", form, ABLATION_FORMS)
    drops = ablation_drops(activations, scores, tail, batch_size=batch_size)  # (N, C, K)
    with torch.no_grad():
        acts = activations.detach()
        dtype = drops.dtype
        s = scores.detach().to(device=acts.device, dtype=dtype)
        out = torch.zeros((n, drops.shape[2], h, w), dtype=dtype, device=acts.device)
        for i in range(n):
            a = acts[i].to(dtype)
            drop = drops[i]  # (C, K)
            if form == "score":
                den = s[i].unsqueeze(0).expand_as(drop)
            else:
                den = a.sum(dim=(1, 2)).unsqueeze(1).expand_as(drop)
            weights = _safe_div(drop, den)
            out[i] = torch.relu(torch.einsum("ck,chw->khw", weights, a))
    return finite(out)


def score_cam(
    images: Tensor,
    activations: Tensor,
    score: ScoreFn,
    *,
    batch_size: int = 32,
) -> Tensor:
    """Score-CAM (Wang et al. 2020): weight feature maps by the score of the image they mask.

    For image ``X`` and channel ``k``: ``H^k = s(Up(A^k))``, with ``Up`` bilinear
    upsampling to the input size (``align_corners=False``) and ``s`` min-max
    normalisation to [0, 1] (a constant channel gives ``H^k = 0``). The paper's
    channel score is ``C(A^k) = f(X * H^k) - f(X_b)`` with the black image as
    baseline ``X_b``, and the weights are ``alpha_k = softmax_k C(A^k)``. The
    softmax over channels is invariant to the per-target constant ``f(X_b)``,
    so it is never evaluated: ``alpha_k = softmax_k f(X * H^k)``, equal to the
    paper's weights. ``f`` is whatever ``score`` returns (logits or
    probabilities). The map is ``ReLU(sum_k alpha_k A^k)``.

    The masked images are built and scored ``batch_size`` channels at a time:
    ``score`` never sees more than ``batch_size`` images, and no more than that
    many masked images exist at once.

    Args:
        images: ``(N, 3, H, W)`` input batch.
        activations: ``(N, C, h, w)`` activations of the layer.
        score: ``score(i, x)`` with ``x`` of shape ``(B, 3, H, W)`` returns
            ``(B, K)``: image ``i``'s K target scores for each input.
        batch_size: masked images per ``score`` call.

    Returns:
        ``(N, K, h, w)`` maps.
    """
    check_4d("images", images)
    check_4d("activations", activations)
    n, _, height, width = images.shape
    if activations.shape[0] != n:
        raise InvalidRequestError(
            f"activations batch {activations.shape[0]} does not match images batch {n}"
        )
    _, c, h, w = activations.shape
    bs = positive_int("batch_size", batch_size)
    dtype = work_dtype(activations)
    with torch.no_grad():
        acts = activations.detach()
        imgs = images.detach()
        out: Tensor | None = None
        for i in range(n):
            a = acts[i].to(dtype)
            chunks: list[Tensor] = []
            k = -1 if out is None else out.shape[1]
            for c0 in range(0, c, bs):
                up = F.interpolate(
                    a[c0 : c0 + bs].unsqueeze(1),
                    size=(height, width),
                    mode="bilinear",
                    align_corners=False,
                )
                low = up.amin(dim=(2, 3), keepdim=True)
                span = up.amax(dim=(2, 3), keepdim=True) - low
                masks = _safe_div(up - low, span)
                masked = imgs[i].unsqueeze(0) * masks.to(imgs.dtype)
                got = _check_output("score", score(i, masked), masked.shape[0], k)
                k = got.shape[1]
                chunks.append(got.to(device=acts.device, dtype=dtype))
            weights = torch.softmax(finite(torch.cat(chunks)), dim=0)  # (C, K)
            if out is None:
                out = torch.zeros((n, k, h, w), dtype=dtype, device=acts.device)
            out[i] = torch.relu(torch.einsum("ck,chw->khw", weights, a))
    assert out is not None  # n >= 1 is checked by _check_4d
    return finite(out)


def occlusion_grid(size: int, mask: int, stride: int) -> list[tuple[int, int]]:
    """The occluded ``[start, end)`` intervals along one image axis (001 sec. 5.1).

    Mask centres sit at ``0, stride, 2*stride, ... < size``; a mask of ``mask``
    pixels centred at ``p`` covers ``[p - mask//2, p - mask//2 + mask)`` of the
    zero-padded axis, clipped to the image. When the last centre's mask stops
    short of the last pixel, one more centre at ``size - 1`` is added, so the
    border is covered like the rest of the image.
    """
    half = mask // 2
    centres = list(range(0, size, stride))
    if centres[-1] - half + mask < size:
        centres.append(size - 1)
    return [(max(0, p - half), min(size, p - half + mask)) for p in centres]


def occlusion(
    images: Tensor,
    base_scores: Tensor,
    score: ScoreFn,
    *,
    mask: int = 35,
    stride: int = 8,
    fill: float = 0.0,
    batch_size: int = 64,
) -> Tensor:
    """Occlusion map (001 sec. 5.1; Zeiler & Fergus 2014).

    A ``mask x mask`` square of value ``fill`` slides over the zero-padded image
    at the positions of :func:`occlusion_grid` (rows x columns); at each position
    the change of each target score, ``base - occluded``, is stored. Positive
    values mark evidence for the target (the score falls when the region is
    hidden), negative values regions whose removal raises it (001 Fig. A6). Each
    output pixel is the mean change over all positions whose mask covers it,
    so the map has the input's resolution; a pixel no mask covers (only when
    ``mask < stride``) gets 0. Occluded copies are scored ``batch_size`` at a time.

    Args:
        images: ``(N, 3, H, W)`` input batch.
        base_scores: ``(N, K)`` the target scores of the unoccluded images.
        score: ``score(i, x)`` with ``x`` of shape ``(B, 3, H, W)`` returns
            ``(B, K)``: image ``i``'s K target scores for each input.
        mask: side of the square mask in pixels (001 suggests 35).
        stride: distance in pixels between neighbouring mask positions.
        fill: value written into the occluded square.
        batch_size: occluded images per ``score`` call.

    Returns:
        ``(N, K, H, W)`` maps of mean score change.
    """
    check_4d("images", images)
    n, _, height, width = images.shape
    k = _check_scores("base_scores", base_scores, n)
    m = positive_int("mask", mask)
    st = positive_int("stride", stride)
    bs = positive_int("batch_size", batch_size)
    fill_value = float(fill)
    if fill_value != fill_value or abs(fill_value) == float("inf"):
        raise InvalidRequestError(f"fill must be a finite number, got {fill!r}")
    dtype = work_dtype(images)
    device = images.device
    rows = _coverage(occlusion_grid(height, m, st), height, dtype, device)  # (Py, H)
    cols = _coverage(occlusion_grid(width, m, st), width, dtype, device)  # (Px, W)
    py, px = rows.shape[0], cols.shape[0]
    count = rows.sum(0).unsqueeze(1) * cols.sum(0).unsqueeze(0)  # (H, W)
    with torch.no_grad():
        imgs = images.detach()
        base = base_scores.detach().to(device=device, dtype=dtype)
        out = torch.zeros((n, k, height, width), dtype=dtype, device=device)
        for i in range(n):
            deltas = torch.empty((py * px, k), dtype=dtype, device=device)
            for p0 in range(0, py * px, bs):
                pos = torch.arange(p0, min(p0 + bs, py * px), device=device)
                hidden = rows[pos // px].unsqueeze(2) * cols[pos % px].unsqueeze(1)  # (B, H, W)
                batch = torch.where(
                    hidden.unsqueeze(1) > 0,
                    torch.tensor(fill_value, dtype=imgs.dtype, device=device),
                    imgs[i].unsqueeze(0),
                )
                got = _check_output("score", score(i, batch), batch.shape[0], k)
                deltas[p0 : p0 + batch.shape[0]] = base[i].unsqueeze(0) - got.to(dtype)
            grid = deltas.reshape(py, px, k).permute(2, 0, 1)  # (K, Py, Px)
            total = rows.t().unsqueeze(0) @ grid @ cols.unsqueeze(0)  # (K, H, W)
            out[i] = _safe_div(total, count.unsqueeze(0).expand_as(total))
    return finite(out)


# ---------------------------------------------------------------- helpers


def _coverage(
    spans: list[tuple[int, int]], size: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    cover = torch.zeros((len(spans), size), dtype=dtype, device=device)
    for j, (lo, hi) in enumerate(spans):
        cover[j, lo:hi] = 1
    return cover


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``|den| >= 1e-7`` (and finite), else 0."""
    ok = (den.abs() >= _EPS) & torch.isfinite(den)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _check_scores(name: str, t: object, n: int) -> int:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] != n or t.shape[1] == 0:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise InvalidRequestError(f"{name} must have shape ({n}, K) with K >= 1, got {shape}")
    return int(t.shape[1])


def _check_output(name: str, t: object, b: int, k: int) -> Tensor:
    """Check that a callable returned ``(b, k)`` scores (``k = -1``: any K >= 1)."""
    ok = isinstance(t, Tensor) and t.dim() == 2 and t.shape[0] == b
    if ok and isinstance(t, Tensor):
        ok = t.shape[1] == k if k >= 0 else t.shape[1] >= 1
        if ok:
            return t.detach()
    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    want = f"({b}, {k})" if k >= 0 else f"({b}, K)"
    raise InvalidRequestError(f"{name} callable must return scores of shape {want}, got {shape}")

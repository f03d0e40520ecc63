"""Gradient methods: pure functions of the layer's activations and gradients.

Every function takes ``acts`` ``(N, C, h, w)`` (the feature maps ``A^k``) and
``grads`` ``(N, K, C, h, w)`` (``g^k_ij = dy^c/dA^k_ij`` for each of the K
targets) and returns float32 maps ``(N, K, h, w)``. They never run the
network; the engine gets every gradient from one batched backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from camserve.engine._numerics import finite, safe_div
from camserve.engine.methods._base import combine, combine_elementwise, work

__all__ = [
    "CHANNEL_WEIGHTS",
    "counterfactual",
    "gradcam",
    "gradcam_abs",
    "gradcam_gmp",
    "gradcam_norelu",
    "gradcam_pos",
    "gradcampp",
    "hirescam",
    "layercam",
    "xgradcam",
]


def gradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM's channel weights ``w_k^c = (1/Z) sum_ij g^k_ij`` ``(N, K, C)`` (002 eq. 1)."""
    return work(grads).mean(dim=(-2, -1))


def gradcam_pos_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM+'s channel weights ``w = (1/Z) sum_ij ReLU(g)`` ``(N, K, C)`` (002 eq. 3)."""
    return work(grads).clamp(min=0).mean(dim=(-2, -1))


def gradcam_abs_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Channel weights ``w = (1/Z) sum_ij |g|`` ``(N, K, C)`` (001 sec. 5.3.2)."""
    return work(grads).abs().mean(dim=(-2, -1))


def gradcam_gmp_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Channel weights ``w = max_ij g`` ``(N, K, C)`` (001 sec. 5.3.3)."""
    return work(grads).amax(dim=(-2, -1))


def counterfactual_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Channel weights ``w = -(1/Z) sum_ij g`` ``(N, K, C)`` (001 sec. 3)."""
    return -work(grads).mean(dim=(-2, -1))


def xgradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """XGrad-CAM's channel weights ``w = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij`` (004, 000 eq. 9).

    ``(N, K, C)``; a channel whose activations sum to (nearly) zero gets weight 0.
    """
    a = work(acts)
    norm = safe_div(a, a.sum(dim=(-2, -1), keepdim=True))  # (N, C, h, w)
    return (norm[:, None] * work(grads)).sum(dim=(-2, -1))


CHANNEL_WEIGHTS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], bool]] = {
    "gradcam": (gradcam_weights, True),
    "gradcam_pos": (gradcam_pos_weights, True),
    "gradcam_norelu": (gradcam_weights, False),
    "gradcam_abs": (gradcam_abs_weights, True),
    "gradcam_gmp": (gradcam_gmp_weights, True),
    "counterfactual": (counterfactual_weights, True),
    "xgradcam": (xgradcam_weights, True),
}
"""Method id -> (its channel-weight function ``(acts, grads) -> (N, K, C)``, final ReLU):
the gradient methods whose map is ``ReLU(sum_k w_k A^k)`` (or ``sum_k w_k A^k``) with
weights from the layer's true gradients; each map function below is built from it."""


def gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM: ``w_k^c = (1/Z) sum_ij g^k_ij``, ``L = ReLU(sum_k w_k A^k)`` (002 eq. 1-2).

    Also used with guided-ReLU or deconv-ReLU gradients (001 Table A2).
    """
    return combine(acts, gradcam_weights(acts, grads))


def gradcam_pos(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM+: positive gradients only, ``w = (1/Z) sum_ij ReLU(g)`` (002 eq. 3)."""
    return combine(acts, gradcam_pos_weights(acts, grads))


def gradcam_norelu(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM without the final ReLU (001 sec. 5.3.1, Table A2): signed maps."""
    return combine(acts, gradcam_weights(acts, grads), relu=False)


def gradcam_abs(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM with absolute gradients, ``w = (1/Z) sum_ij |g|`` (001 sec. 5.3.2)."""
    return combine(acts, gradcam_abs_weights(acts, grads))


def gradcam_gmp(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM with global max pooling of the gradients, ``w = max_ij g`` (001 sec. 5.3.3)."""
    return combine(acts, gradcam_gmp_weights(acts, grads))


def counterfactual(acts: Tensor, grads: Tensor) -> Tensor:
    """Counterfactual Grad-CAM: ``w = -(1/Z) sum_ij g`` (001 sec. 3).

    Highlights regions whose removal would raise the confidence in the target.
    """
    return combine(acts, counterfactual_weights(acts, grads))


def xgradcam(acts: Tensor, grads: Tensor) -> Tensor:
    """XGrad-CAM: ``w = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij`` (004, 000 sec. 3).

    A channel whose activations sum to (nearly) zero gets weight 0.
    """
    return combine(acts, xgradcam_weights(acts, grads))


def layercam(acts: Tensor, grads: Tensor) -> Tensor:
    """Layer-CAM: per-position weights ``ReLU(g^k_ij)``, ``L = ReLU(sum_k ReLU(g^k) ∘ A^k)``."""
    return combine_elementwise(acts, work(grads).clamp(min=0))


def hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    """HiResCAM: ``L = ReLU(sum_k g^k ∘ A^k)`` (the gradient is not averaged).

    Equals Grad-CAM up to a constant on a GAP + linear head (uniform gradients).
    """
    return combine_elementwise(acts, work(grads))


def _alpha_stats(alpha: Tensor, term: Tensor, nonzero: Tensor) -> dict[str, float]:
    """The statistics 002 plots (Fig. 3-4): non-zero alphas and ``sum_ab A g``.

    Count, min, max and mean are exact over every non-zero alpha; quartiles,
    medians and the shares (outliers beyond 1.5 IQR, alphas within 0.05 of
    1/2, the mean of ``tanh(alpha - 1/2)``) come from a deterministic strided
    sample of at most about 16,384 entries (so do the ``term_*`` numbers),
    so the statistics stay cheap.
    """
    a, t, nz = alpha.flatten(), term.flatten(), nonzero.flatten()
    count = int(nz.sum())
    stats: dict[str, float] = {"alpha_count": float(count), "alpha_zero": float(nz.numel() - count)}
    if count == 0:
        return stats | {k: 0.0 for k in ("alpha_min", "alpha_max", "alpha_mean", "alpha_median")}
    step = max(1, a.numel() // 16384)
    keep = nz[::step]
    sample, tsample = a[::step][keep].double(), t[::step][keep].double()
    if sample.numel() == 0:  # the stride missed every non-zero alpha
        sample, tsample = a[nz][:16384].double(), t[nz][:16384].double()
    ordered = sample.sort().values
    m = ordered.numel() - 1
    q = [ordered[round(f * m)] for f in (0.25, 0.5, 0.75)]  # nearest-rank quartiles
    iqr = float(q[2] - q[0])
    lo, hi = float(q[0]) - 1.5 * iqr, float(q[2]) + 1.5 * iqr
    big = torch.finfo(a.dtype).max
    stats |= {
        "alpha_min": float(a.masked_fill(~nz, big).min()),
        "alpha_max": float(a.masked_fill(~nz, -big).max()),
        "alpha_mean": float(a.sum(dtype=torch.float64)) / count,  # alpha is 0 where g = 0
        "alpha_q25": float(q[0]),
        "alpha_median": float(q[1]),
        "alpha_q75": float(q[2]),
        "alpha_outlier_share": float(((sample < lo) | (sample > hi)).double().mean()),
        "alpha_near_half_share": float(((sample - 0.5).abs() < 0.05).double().mean()),
        "tanh_alpha_minus_half_mean": float(torch.tanh(sample - 0.5).mean()),
        "term_min": float(tsample.min()),
        "term_max": float(tsample.max()),
        "term_median": float(tsample.kthvalue(tsample.numel() // 2 + 1).values),
    }
    return {k: float(finite(torch.tensor(v, dtype=torch.float64))) for k, v in stats.items()}


def gradcampp(
    acts: Tensor,
    grads: Tensor,
    logit_grads: Tensor | None = None,
    *,
    normalize_alpha: bool = False,
    stats: bool = False,
    eps: float = 1e-7,
) -> tuple[Tensor, dict[str, float]]:
    """Grad-CAM++ as implemented (002 eq. 4 and 9) with a safe denominator.

    ``alpha^k_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` with ``g = dS^c/dA^k_ij``
    the gradient of the pre-softmax score; ``alpha = 0`` where ``g = 0``. It is
    computed in the equivalent form ``1 / (2 + sum_ab A^k_ab g)`` (002 eq. 13),
    which cannot under- or overflow through the powers; a denominator closer
    to 0 than ``eps`` is replaced by ``±eps`` (002 sec. 3.4 saw alphas of
    -1.4e6; they stay finite here). The weights are
    ``w_k^c = sum_ij alpha^k_ij ReLU(dy^c/dA^k_ij)`` with ``y^c`` the chosen score.

    Args:
        acts: ``(N, C, h, w)``.
        grads: ``(N, K, C, h, w)`` gradients of the chosen score ``y^c``.
        logit_grads: gradients of the pre-softmax score ``S^c`` for the
            alphas; None when the chosen score is the logit (then ``grads``).
        normalize_alpha: divide the alphas of each channel by their sum over
            the positions with a positive gradient, as the official code does
            (a zero sum is left alone).
        stats: also compute the alpha statistics 002 plots (Fig. 3-4). They
            cost more than the maps (a strided sample, a sort, masked
            reductions over every alpha), so they are off unless asked for.
        eps: smallest magnitude of the denominator.

    Returns:
        The maps ``(N, K, h, w)`` and, when ``stats`` is true, the alpha
        statistics (count, min, max, mean, quartiles, outlier share, share
        near 1/2, ``sum_ab A g``); an empty dict otherwise.
    """
    g_y = work(grads)
    g = g_y if logit_grads is None else work(logit_grads)
    a_sum = work(acts).sum(dim=(-2, -1), keepdim=True)[:, None]  # (N, 1, C, 1, 1)
    term = finite(a_sum * g)
    den = term + 2.0
    den = torch.copysign(den.abs().clamp_(min=eps), den)  # |den| >= eps, sign kept (+0 -> +eps)
    alpha = den.reciprocal_()  # finite: |1/den| <= 1/eps
    st: dict[str, float] = {}
    if stats or logit_grads is not None:
        # alpha = 0 where g = 0. Without separate logit gradients ReLU(g) is 0
        # there anyway, so the weights need no mask (the sums are identical).
        nonzero = g != 0
        alpha.mul_(nonzero)
        if stats:
            st = _alpha_stats(alpha, term, nonzero)
        del nonzero
    del term
    pos = g_y.clamp(min=0)
    if normalize_alpha:
        const = torch.where(pos > 0, alpha, torch.zeros_like(alpha)).sum(dim=(-2, -1), keepdim=True)
        alpha = finite(alpha / torch.where(const != 0, const, torch.ones_like(const)))
    weights = finite(alpha.mul_(pos).sum(dim=(-2, -1)))
    return combine(acts, weights), st

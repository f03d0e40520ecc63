"""Reference-based input attributions: Integrated Gradients and GradientSHAP.

Both integrate input gradients between a reference (baseline) image and the
input (003 sec. on IG and SHAP compares them with Grad-CAM). The functions are
pure: the engine hands them ``input_grad(i, x) -> (scores (B, K), grads
(B, K, 3, H, W))``, image ``i``'s K target scores at the inputs ``x`` and their
gradients with respect to ``x``. Attributions are summed over colour channels
and returned at input resolution ``(N, K, H, W)``.

* :func:`integrated_gradients` / :func:`integrated_gradients_with_delta`:
  Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
* :func:`gradient_shap`: Lundberg & Lee, "A Unified Approach to Interpreting
  Model Predictions", NeurIPS 2017 (expected gradients), as implemented by
  captum's ``GradientShap`` (003 footnote 4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from camserve.engine._numerics import finite
from camserve.engine.methods._checks import check_4d, positive_int, work_dtype
from camserve.errors import InvalidRequestError, UnknownNameError

__all__ = [
    "IG_RULES",
    "gradient_shap",
    "integrated_gradients",
    "integrated_gradients_with_delta",
    "path_points",
]

#: Quadrature rules of :func:`integrated_gradients` (captum's names).
IG_RULES = ("trapezoid", "riemann_left", "riemann_right", "riemann_middle")

InputGradFn = Callable[[int, Tensor], tuple[Tensor, Tensor]]


def path_points(steps: int, rule: str = "trapezoid") -> tuple[list[float], list[float]]:
    """Points ``alpha_j`` on [0, 1] and weights of the IG quadrature.

    ``steps`` is the number of sub-intervals of [0, 1]: the Riemann rules
    evaluate ``steps`` points (left ends, right ends or midpoints, weight
    ``1/steps`` each); the trapezoid rule evaluates ``steps + 1`` points
    ``j/steps`` with weights ``1/steps`` (halved at both ends).
    """
    m = positive_int("steps", steps)
    if rule == "trapezoid":
        alphas = [j / m for j in range(m + 1)]
        weights = [1.0 / m] * (m + 1)
        weights[0] = weights[-1] = 0.5 / m
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}.get(rule)
    if offset is None:
        raise UnknownNameError("rule", rule, IG_RULES)
    return [(j + offset) / m for j in range(m)], [1.0 / m] * m


def integrated_gradients(
    images: Tensor,
    input_grad: InputGradFn,
    *,
    baseline: Tensor | None = None,
    steps: int = 32,
    rule: str = "trapezoid",
    batch_size: int = 32,
) -> Tensor:
    """Integrated Gradients (Sundararajan et al. 2017), summed over colour channels.

    ``IG_c(x) = (x - x') * int_0^1 dF_c(x' + a (x - x')) / dx da``, the integral
    approximated by :func:`path_points` (trapezoid rule by default). The
    baseline ``x'`` is the black image unless given. Completeness says
    ``sum IG_c = F_c(x) - F_c(x')``; :func:`integrated_gradients_with_delta`
    also returns how far the approximation is from it.

    Args:
        images: ``(N, 3, H, W)`` inputs.
        input_grad: ``input_grad(i, x)`` with ``x`` of shape ``(B, 3, H, W)``
            returns image ``i``'s target scores ``(B, K)`` and their input
            gradients ``(B, K, 3, H, W)``.
        baseline: ``(3, H, W)``, ``(1, 3, H, W)`` or ``(N, 3, H, W)``; zeros if None.
        steps: number of sub-intervals of the path.
        rule: one of :data:`IG_RULES`.
        batch_size: path points per ``input_grad`` call.

    Returns:
        ``(N, K, H, W)`` attributions.
    """
    return _integrate(images, input_grad, baseline, steps, rule, batch_size, False)[0]


def integrated_gradients_with_delta(
    images: Tensor,
    input_grad: InputGradFn,
    *,
    baseline: Tensor | None = None,
    steps: int = 32,
    rule: str = "trapezoid",
    batch_size: int = 32,
) -> tuple[Tensor, Tensor]:
    """:func:`integrated_gradients` and its completeness delta (the audit's axiom check).

    Returns:
        ``(attributions (N, K, H, W), delta (N, K))`` with
        ``delta = sum_xy IG_c - (F_c(x) - F_c(x'))``; it goes to 0 as ``steps``
        grows (exactly 0 for a network linear along the path). The end-point
        scores come from the trapezoid rule's own evaluations at ``a = 0, 1``;
        the Riemann rules need one extra ``input_grad`` call per image.
    """
    attributions, delta = _integrate(images, input_grad, baseline, steps, rule, batch_size, True)
    assert delta is not None
    return attributions, delta


def gradient_shap(
    images: Tensor,
    input_grad: InputGradFn,
    *,
    baselines: Tensor | None = None,
    samples: int = 16,
    stdev: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
) -> Tensor:
    """GradientSHAP (expected gradients) as in captum's ``GradientShap``.

    For each image ``x`` and each of ``samples`` draws ``s``: Gaussian noise
    ``x_s = x + N(0, stdev^2)``, a baseline ``b_s`` drawn uniformly from
    ``baselines``, a point ``a_s ~ U[0, 1]`` on the path, and the attribution is
    ``mean_s (x_s - b_s) * dF_c(b_s + a_s (x_s - b_s)) / dx``, summed over colour
    channels. Random numbers come from a ``torch.Generator`` on the images'
    device seeded with ``seed``, drawn per image in this order: noise
    ``(samples, 3, H, W)``, baseline indices ``(samples,)``, ``a`` ``(samples,)``.
    The same seed gives the same result on the same device.

    Args:
        images: ``(N, 3, H, W)`` inputs.
        input_grad: as for :func:`integrated_gradients`.
        baselines: ``(M, 3, H, W)`` or ``(3, H, W)`` reference distribution;
            the black image if None.
        samples: draws per image.
        stdev: standard deviation of the input noise (0 disables it).
        seed: seed of the generator.
        batch_size: points per ``input_grad`` call.

    Returns:
        ``(N, K, H, W)`` attributions.
    """
    check_4d("images", images)
    n, ch, height, width = images.shape
    refs = _baselines(baselines, images)
    count = positive_int("samples", samples)
    bs = positive_int("batch_size", batch_size)
    noise_std = float(stdev)
    if not noise_std >= 0 or noise_std == float("inf"):
        raise InvalidRequestError(f"stdev must be a finite number >= 0, got {stdev!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}")
    dtype = work_dtype(images)
    device = images.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out: Tensor | None = None
    for i in range(n):
        x = images[i].detach().to(dtype)
        noise = torch.randn((count, ch, height, width), generator=gen, device=device, dtype=dtype)
        pick = torch.randint(refs.shape[0], (count,), generator=gen, device=device)
        alpha = torch.rand((count,), generator=gen, device=device, dtype=dtype)
        noisy = x.unsqueeze(0) + noise_std * noise
        diff = noisy - refs[pick]
        points = refs[pick] + alpha.view(-1, 1, 1, 1) * diff
        k = -1 if out is None else out.shape[1]
        total: Tensor | None = None
        for s0 in range(0, count, bs):
            chunk = points[s0 : s0 + bs].to(images.dtype)
            _, grads = _call(input_grad, i, chunk, k, (ch, height, width))
            k = grads.shape[1]
            part = (diff[s0 : s0 + bs].unsqueeze(1) * grads.to(dtype)).sum(dim=(0, 2))
            total = part if total is None else total + part
        assert total is not None
        if out is None:
            out = torch.zeros((n, k, height, width), dtype=dtype, device=device)
        out[i] = total / count
    assert out is not None
    return finite(out)


# ---------------------------------------------------------------- helpers


def _integrate(
    images: Tensor,
    input_grad: InputGradFn,
    baseline: Tensor | None,
    steps: int,
    rule: str,
    batch_size: int,
    want_delta: bool,
) -> tuple[Tensor, Tensor | None]:
    check_4d("images", images)
    n, ch, height, width = images.shape
    alphas, weights = path_points(steps, rule)
    bs = positive_int("batch_size", batch_size)
    refs = _baselines(baseline, images)
    if refs.shape[0] not in (1, n):
        raise InvalidRequestError(
            f"baseline must hold 1 or {n} images, got shape {tuple(refs.shape)}"
        )
    dtype = work_dtype(images)
    device = images.device
    a_all = torch.tensor(alphas, dtype=dtype, device=device)
    w_all = torch.tensor(weights, dtype=dtype, device=device)
    out: Tensor | None = None
    delta: Tensor | None = None
    for i in range(n):
        x = images[i].detach().to(dtype)
        ref = refs[i if refs.shape[0] == n else 0]
        diff = x - ref
        k = -1 if out is None else out.shape[1]
        avg_grad: Tensor | None = None
        path_scores: list[Tensor] = []
        for p0 in range(0, len(alphas), bs):
            a = a_all[p0 : p0 + bs].view(-1, 1, 1, 1)
            points = (ref.unsqueeze(0) + a * diff.unsqueeze(0)).to(images.dtype)
            scores, grads = _call(input_grad, i, points, k, (ch, height, width))
            k = grads.shape[1]
            path_scores.append(scores.to(dtype))
            w = w_all[p0 : p0 + bs].view(-1, 1, 1, 1, 1)
            part = (w * grads.to(dtype)).sum(0)  # (K, 3, H, W)
            avg_grad = part if avg_grad is None else avg_grad + part
        assert avg_grad is not None
        if out is None:
            out = torch.zeros((n, k, height, width), dtype=dtype, device=device)
            delta = torch.zeros((n, k), dtype=dtype, device=device) if want_delta else None
        out[i] = (diff.unsqueeze(0) * avg_grad).sum(1)
        if delta is not None:
            if alphas[0] == 0.0 and alphas[-1] == 1.0:
                ends = torch.cat(path_scores)[[0, -1]]
            else:
                pair = torch.stack([ref, x]).to(images.dtype)
                ends = _call(input_grad, i, pair, k, (ch, height, width))[0].to(dtype)
            delta[i] = out[i].sum(dim=(1, 2)) - (ends[1] - ends[0])
    assert out is not None
    return finite(out), None if delta is None else finite(delta)


def _call(
    input_grad: InputGradFn, i: int, points: Tensor, k: int, image_shape: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """Call ``input_grad`` and check ``(B, K)`` scores and ``(B, K, 3, H, W)`` grads."""
    got = input_grad(i, points.detach())
    b = points.shape[0]
    ok = isinstance(got, tuple) and len(got) == 2
    if ok:
        scores, grads = got
        ok = (
            isinstance(scores, Tensor)
            and isinstance(grads, Tensor)
            and scores.dim() == 2
            and scores.shape[0] == b
            and scores.shape[1] >= 1
            and (k < 0 or scores.shape[1] == k)
            and tuple(grads.shape) == (b, scores.shape[1], *image_shape)
        )
        if ok:
            return scores.detach(), grads.detach()
    shapes = (
        tuple(tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in got)
        if isinstance(got, tuple)
        else type(got).__name__
    )
    kk = "K" if k < 0 else str(k)
    raise InvalidRequestError(
        f"input_grad must return scores ({b}, {kk}) and grads ({b}, {kk}, "
        f"{', '.join(map(str, image_shape))}), got {shapes}"
    )


def _baselines(refs: Tensor | None, images: Tensor) -> Tensor:
    """Baselines as ``(M, 3, H, W)`` in the work dtype on the images' device."""
    dtype = work_dtype(images)
    if refs is None:
        return torch.zeros((1, *images.shape[1:]), dtype=dtype, device=images.device)
    if not isinstance(refs, Tensor) or not refs.is_floating_point():
        raise InvalidRequestError(f"baselines must be a float tensor, got {refs!r:.60}")
    given = tuple(refs.shape)
    if refs.dim() == 3:
        refs = refs.unsqueeze(0)
    if refs.dim() != 4 or refs.shape[0] == 0 or refs.shape[1:] != images.shape[1:]:
        raise InvalidRequestError(
            f"baseline shape {given} does not match images {tuple(images.shape)}"
        )
    return refs.detach().to(device=images.device, dtype=dtype)

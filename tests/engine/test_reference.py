"""Integrated Gradients and GradientSHAP against slow references written from the formulas."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from camserve.engine.methods.reference import (
    IG_RULES,
    gradient_shap,
    integrated_gradients,
    integrated_gradients_with_delta,
    path_points,
)
from camserve.errors import InvalidRequestError, UnknownNameError

DT = torch.float64
InputGrad = Callable[[int, Tensor], tuple[Tensor, Tensor]]


def close(got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def net(seed: int = 0) -> nn.Module:
    """2 convs + GAP + linear on 16x16 inputs (piecewise linear in the input)."""
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 5),
        )
        .to(DT)
        .eval()
    )


def linear_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)).to(DT).eval()


def images(n: int = 2, seed: int = 1) -> Tensor:
    torch.manual_seed(seed)
    return torch.rand(n, 3, 16, 16, dtype=DT)


def input_grad_of(model: nn.Module, targets: Tensor) -> InputGrad:
    """What the engine hands over: image i's K target scores and their input gradients."""

    def input_grad(i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        out = model(x)[:, targets[i]]
        grads = [
            torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)[0]
            for k in range(out.shape[1])
        ]
        return out.detach(), torch.stack(grads, dim=1)

    return input_grad


def grad_one(model: nn.Module, x: Tensor, cls: int) -> tuple[float, Tensor]:
    """Score and gradient of one class at one (3, H, W) input."""
    x = x.detach().unsqueeze(0).requires_grad_(True)
    s = model(x)[0, cls]
    (g,) = torch.autograd.grad(s, x)
    return s.item(), g[0]


TARGETS = torch.tensor([[0, 3], [4, 1]])


# ------------------------------------------------------------------ Integrated Gradients


def ig_reference(model: nn.Module, x: Tensor, base: Tensor, steps: int, rule: str) -> Tensor:
    """IG_c = (x - x') * sum_j w_j grad F_c(x' + a_j (x - x')); one step, one target at a time."""
    if rule == "trapezoid":
        alphas = [j / steps for j in range(steps + 1)]
        weights = [(0.5 if j in (0, steps) else 1.0) / steps for j in range(steps + 1)]
    else:
        off = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        alphas = [(j + off) / steps for j in range(steps)]
        weights = [1.0 / steps] * steps
    out = torch.zeros(x.shape[0], TARGETS.shape[1], 16, 16, dtype=DT)
    for i in range(x.shape[0]):
        for j, cls in enumerate(TARGETS[i].tolist()):
            acc = torch.zeros(3, 16, 16, dtype=DT)
            for a, w in zip(alphas, weights, strict=True):
                acc += w * grad_one(model, base[i] + a * (x[i] - base[i]), cls)[1]
            out[i, j] = ((x[i] - base[i]) * acc).sum(0)
    return out


@pytest.mark.parametrize("rule", IG_RULES)
def test_ig_matches_reference(rule: str) -> None:
    model, x = net(), images()
    got = integrated_gradients(x, input_grad_of(model, TARGETS), steps=7, rule=rule, batch_size=3)
    assert got.shape == (2, 2, 16, 16)
    close(got, ig_reference(model, x, torch.zeros_like(x), 7, rule))
    assert got.abs().sum() > 0


def test_ig_with_baseline_and_delta_matches_reference() -> None:
    model, x = net(), images()
    base = torch.full((3, 16, 16), 0.3, dtype=DT)
    got, delta = integrated_gradients_with_delta(
        x, input_grad_of(model, TARGETS), baseline=base, steps=5
    )
    close(got, ig_reference(model, x, base.expand_as(x), 5, "trapezoid"))
    for i in range(2):
        for j, cls in enumerate(TARGETS[i].tolist()):
            diff = grad_one(model, x[i], cls)[0] - grad_one(model, base, cls)[0]
            assert delta[i, j].item() == pytest.approx(got[i, j].sum().item() - diff, abs=1e-9)


@pytest.mark.parametrize("rule", IG_RULES)
def test_ig_is_complete_on_a_linear_net(rule: str) -> None:
    model, x = linear_net(), images()
    _, delta = integrated_gradients_with_delta(x, input_grad_of(model, TARGETS), steps=1, rule=rule)
    assert delta.abs().max().item() < 1e-9


def test_ig_completeness_converges_on_a_relu_net() -> None:
    """Completeness (Sundararajan et al. 2017): the quadrature error falls as steps grow."""
    model, x = net(), images()
    ig = input_grad_of(model, TARGETS)
    errors = [
        integrated_gradients_with_delta(x, ig, steps=s, batch_size=64)[1].abs().max().item()
        for s in (2, 8, 32, 128)
    ]
    assert errors[0] > 1e-4  # the test can fail: the path is not linear
    assert errors[-1] < errors[0] / 20
    assert errors[-1] < 1e-4


def test_ig_batch_size_does_not_change_the_result() -> None:
    model, x = net(), images()
    ig = input_grad_of(model, TARGETS)
    close(integrated_gradients(x, ig, steps=9, batch_size=1), integrated_gradients(x, ig, steps=9))


def test_path_points() -> None:
    assert path_points(2) == ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    assert path_points(2, "riemann_middle") == ([0.25, 0.75], [0.5, 0.5])
    assert path_points(1, "riemann_right") == ([1.0], [1.0])


# ------------------------------------------------------------------ GradientSHAP


def shap_reference(
    model: nn.Module, x: Tensor, refs: Tensor, samples: int, stdev: float, seed: int
) -> Tensor:
    """One sample and one target at a time, drawing as documented (noise, baseline, alpha)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(x.shape[0], TARGETS.shape[1], 16, 16, dtype=DT)
    for i in range(x.shape[0]):
        noise = torch.randn((samples, 3, 16, 16), generator=gen, dtype=DT)
        pick = torch.randint(refs.shape[0], (samples,), generator=gen)
        alpha = torch.rand((samples,), generator=gen, dtype=DT)
        for j, cls in enumerate(TARGETS[i].tolist()):
            acc = torch.zeros(3, 16, 16, dtype=DT)
            for s in range(samples):
                noisy = x[i] + stdev * noise[s]
                b = refs[pick[s]]
                point = b + alpha[s].item() * (noisy - b)
                acc += (noisy - b) * grad_one(model, point, cls)[1]
            out[i, j] = acc.sum(0) / samples
    return out


def test_gradient_shap_matches_reference() -> None:
    model, x = net(), images()
    refs = torch.rand(3, 3, 16, 16, dtype=DT)
    got = gradient_shap(
        x, input_grad_of(model, TARGETS), baselines=refs, samples=5, stdev=0.2, seed=7, batch_size=2
    )
    assert got.shape == (2, 2, 16, 16)
    close(got, shap_reference(model, x, refs, 5, 0.2, 7))
    assert got.abs().sum() > 0


def test_gradient_shap_is_deterministic_with_the_seed() -> None:
    model, x = net(), images()
    ig = input_grad_of(model, TARGETS)
    a = gradient_shap(x, ig, samples=4, seed=3)
    assert torch.equal(a, gradient_shap(x, ig, samples=4, seed=3))
    close(a, gradient_shap(x, ig, samples=4, seed=3, batch_size=1))
    assert not torch.allclose(a, gradient_shap(x, ig, samples=4, seed=4))


def test_gradient_shap_without_noise_on_a_linear_net_is_input_times_weight() -> None:
    """Without noise, E[(x - b) * W] = (x - b) * W whatever the path points drawn."""
    model, x = linear_net(), images()
    got = gradient_shap(x, input_grad_of(model, TARGETS), samples=3, stdev=0.0)
    weight = model[1].weight.detach().view(5, 3, 16, 16)
    want = torch.stack([(x[i] * weight[TARGETS[i]]).sum(1) for i in range(2)])
    close(got, want)


# ------------------------------------------------------------------ adversarial inputs, validation


def test_zero_and_huge_inputs_stay_finite() -> None:
    model = net()
    ig = input_grad_of(model, TARGETS)
    zeros = torch.zeros(2, 3, 16, 16, dtype=DT)
    out, delta = integrated_gradients_with_delta(zeros, ig, steps=3)
    assert (out == 0).all() and torch.isfinite(delta).all()
    assert torch.isfinite(gradient_shap(zeros, ig, samples=2)).all()
    huge = images() * 1e300
    assert torch.isfinite(integrated_gradients(huge, ig, steps=2)).all()
    assert torch.isfinite(gradient_shap(huge, ig, samples=2)).all()

    def nan_grad(i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        return torch.full((b, 2), math.nan, dtype=DT), torch.full((b, 2, 3, 16, 16), math.inf)

    out, delta = integrated_gradients_with_delta(images(), nan_grad, steps=2)
    assert torch.isfinite(out).all() and torch.isfinite(delta).all()
    assert torch.isfinite(gradient_shap(images(), nan_grad, samples=2)).all()


def test_arguments_are_validated() -> None:
    ig = input_grad_of(net(), TARGETS)
    x = images()
    with pytest.raises(InvalidRequestError, match=r"steps.*0"):
        integrated_gradients(x, ig, steps=0)
    with pytest.raises(UnknownNameError, match=r"'simpson'.*riemann_left"):
        integrated_gradients(x, ig, rule="simpson")
    with pytest.raises(InvalidRequestError, match=r"baseline shape \(3, 8, 8\)"):
        integrated_gradients(x, ig, baseline=torch.zeros(3, 8, 8, dtype=DT))
    with pytest.raises(InvalidRequestError, match=r"1 or 2 images.*\(3, 3, 16, 16\)"):
        integrated_gradients(x, ig, baseline=torch.zeros(3, 3, 16, 16, dtype=DT))
    with pytest.raises(InvalidRequestError, match=r"samples.*-1"):
        gradient_shap(x, ig, samples=-1)
    with pytest.raises(InvalidRequestError, match=r"stdev.*-0.5"):
        gradient_shap(x, ig, stdev=-0.5)
    with pytest.raises(InvalidRequestError, match=r"images.*\(3, 16, 16\)"):
        gradient_shap(x[0], ig)
    with pytest.raises(InvalidRequestError, match=r"input_grad must return"):
        integrated_gradients(x, lambda i, p: (torch.zeros(p.shape[0], 2), torch.zeros(1)))

"""Guided backpropagation across the ReLU family, module or functional (001 sec. 5.3.4).

Each activation gets a reference network whose activation is a hand-written
autograd function with the guided rule ``ReLU(g) * d`` (``d`` the local
derivative); the engine's maps must equal the maps from it. Smooth
activations, for which the rule is undefined, are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.errors import UnsupportedMethodError
from tests.engine._nets import ref_map

Act = Callable[[Tensor], Tensor]


class ActNet(nn.Module):
    """conv -> act -> conv -> act -> GAP -> linear; ``act`` a module or a function."""

    def __init__(self, act: Act, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 5)
        self.act = act
        with torch.no_grad():  # spread pre-activations over every piece of the rectifiers
            self.conv1.weight.mul_(8.0)
            self.conv2.weight.mul_(8.0)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.conv1(x))
        a = self.act(self.conv2(a))
        return self.fc(a.mean(dim=(2, 3)))


class _Guided(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Act, d: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.d = d
        with torch.no_grad():
            return fn(x.clone())

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * ctx.d(x).to(g.dtype), None, None


def _leaky(s: float) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, s))


# (activation as the model uses it, plain function, local derivative d(x))
CASES: dict[str, tuple[Callable[[], Act], Act, Callable[[Tensor], Tensor]]] = {
    "nn.ReLU6": (nn.ReLU6, F.relu6, lambda x: (x > 0) & (x < 6)),
    "nn.ReLU6(inplace)": (lambda: nn.ReLU6(inplace=True), F.relu6, lambda x: (x > 0) & (x < 6)),
    "F.relu6": (lambda: F.relu6, F.relu6, lambda x: (x > 0) & (x < 6)),
    "nn.Hardtanh": (
        lambda: nn.Hardtanh(-0.5, 2.0),
        lambda x: F.hardtanh(x, -0.5, 2.0),
        lambda x: (x > -0.5) & (x < 2.0),
    ),
    "Tensor.clamp": (
        lambda: lambda t: t.clamp(0.0, 3.0),
        lambda x: x.clamp(0.0, 3.0),
        lambda x: (x >= 0) & (x <= 3),
    ),
    "torch.clamp(min)": (
        lambda: lambda t: torch.clamp(t, min=0.1),
        lambda x: x.clamp(min=0.1),
        lambda x: x >= 0.1,
    ),
    "Tensor.clamp_min_": (
        lambda: lambda t: t.clamp_min_(0.0),
        lambda x: x.clamp(min=0.0),
        lambda x: x >= 0,
    ),
    "nn.LeakyReLU": (lambda: nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1), _leaky(0.1)),
    "F.leaky_relu(inplace)": (
        lambda: lambda t: F.leaky_relu(t, 0.2, inplace=True),
        lambda x: F.leaky_relu(x, 0.2),
        _leaky(0.2),
    ),
    "nn.PReLU": (lambda: nn.PReLU(init=0.3), lambda x: F.leaky_relu(x, 0.3), _leaky(0.3)),
    "nn.Threshold": (
        lambda: nn.Threshold(0.2, 0.0),
        lambda x: F.threshold(x, 0.2, 0.0),
        lambda x: x > 0.2,
    ),
    "nn.ReLU": (nn.ReLU, F.relu, lambda x: x > 0),
}


def _reference(model: ActNet, fn: Act, d: Callable[[Tensor], Tensor]) -> ActNet:
    ref = ActNet(lambda t: _Guided.apply(t, fn, d))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("act")})
    return ref.double().eval()


def _guided_input_grads(ref: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    out = torch.zeros(x.shape[0], ids.shape[1], *x.shape[1:], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j, c in enumerate(ids[i].tolist()):
            xi = x[i : i + 1].clone().requires_grad_()
            (g,) = torch.autograd.grad(ref(xi)[0, c], xi)
            out[i, j] = g[0]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_guided_backprop_follows_the_rule_of_each_rectifier(case: str) -> None:
    make, fn, d = CASES[case]
    model = ActNet(make()).double().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = Explainer(model, "conv2").explain(
        x, methods=["guided_backprop", "gradcam_guidedrelu", "gradcam"], targets=2
    )
    ids = res.target_ids
    ref = _reference(model, fn, d)
    grads = _guided_input_grads(ref, x, ids)
    want = grads.abs().amax(dim=2)  # the "absmax" channel reduction
    torch.testing.assert_close(res.map("guided_backprop"), want.float(), rtol=1e-5, atol=1e-6)
    # plain input gradients differ: guided backprop is not the plain gradient in disguise
    plain = torch.zeros_like(grads)
    for i in range(2):
        for j, c in enumerate(ids[i].tolist()):
            xi = x[i : i + 1].clone().requires_grad_()
            (plain[i, j],) = torch.autograd.grad(model(xi)[0, c], xi)
    assert not torch.allclose(plain.abs().amax(dim=2), want, atol=1e-6)
    # Guided-ReLU Grad-CAM at conv2: the gradient through the second activation only
    for i in range(2):
        for j, c in enumerate(ids[i].tolist()):
            with torch.no_grad():
                a = model.conv2(model.act(model.conv1(x[i : i + 1].clone())))
            leaf = a.clone().requires_grad_()
            z = _Guided.apply(leaf, fn, d)
            (g,) = torch.autograd.grad(model.fc(z.mean(dim=(2, 3)))[0, c], leaf)
            torch.testing.assert_close(
                res.map("gradcam_guidedrelu")[i, j], ref_map("gradcam", a[0], g[0]).float(),
                rtol=1e-5, atol=1e-6,
            )  # fmt: skip


@pytest.mark.parametrize(
    ("act", "name"),
    [
        (nn.GELU(), "GELU"),
        (nn.SiLU(), "SiLU"),
        (lambda t: F.gelu(t, approximate="tanh"), "GELU"),
        (nn.ELU(), "ELU"),
        (nn.Mish(), "Mish"),
        (nn.Hardswish(), "Hardswish"),
        (nn.Softplus(), "Softplus"),
    ],
)
def test_smooth_activations_are_refused_by_name_for_guided_methods(act: Act, name: str) -> None:
    model = ActNet(act).eval()
    x = torch.randn(2, 3, 8, 8)
    ex = Explainer(model, "conv2")
    for method in ("guided_backprop", "guided_gradcam", "gradcam_guidedrelu", "gradcam_deconvrelu"):
        with pytest.raises(UnsupportedMethodError, match=rf"applies {name}.*undefined"):
            ex.explain(x, methods=[method])
    res = ex.explain(x, methods=["gradcam", "integrated_gradients"])  # not guided: fine
    assert float(res.map("gradcam").abs().max()) > 0


def test_a_network_without_rectifiers_is_refused_for_guided_methods() -> None:
    model = ActNet(torch.sigmoid).eval()  # a gate, not a rectifier
    with pytest.raises(UnsupportedMethodError, match="no ReLU-family activation"):
        Explainer(model, "conv2").explain(torch.randn(1, 3, 8, 8), methods=["guided_backprop"])


def test_a_smooth_activation_before_the_layer_does_not_matter_for_layer_rules() -> None:
    class GeluThenRelu(ActNet):
        def forward(self, x: Tensor) -> Tensor:
            a = F.gelu(self.conv1(x))
            a = F.relu(self.conv2(a))
            return self.fc(a.mean(dim=(2, 3)))

    model = GeluThenRelu(F.relu).eval()
    x = torch.randn(2, 3, 8, 8)
    res = Explainer(model, "conv2").explain(x, methods=["gradcam_guidedrelu"])
    assert res.map("gradcam_guidedrelu").shape == (2, 1, 4, 4)
    with pytest.raises(UnsupportedMethodError, match="GELU"):  # the input path has the GELU
        Explainer(model, "conv2").explain(x, methods=["guided_backprop"])

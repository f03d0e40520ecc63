"""Guided and deconv backward rules for the ReLU family, without editing the user's model.

While :class:`ReluRouting` is active (thread-local, one call), every call of
a piecewise-linear rectifier, module or functional, runs through
:class:`_SwitchReLU`: ``nn.ReLU`` / ``F.relu`` / ``torch.relu`` /
``Tensor.relu`` (and their in-place forms), ``nn.ReLU6`` / ``F.relu6``,
``nn.Hardtanh`` / ``F.hardtanh``, ``torch.clamp`` / ``clip`` / ``clamp_min`` /
``clamp_max`` (functions and methods), ``nn.LeakyReLU`` / ``F.leaky_relu``,
``nn.PReLU`` / ``F.prelu``, ``nn.RReLU`` in eval mode and ``nn.Threshold`` /
``F.threshold``. Its forward is the op itself; its backward follows
:attr:`ReluState.mode`, read when the backward runs, so one forward serves a
normal, a guided and a deconv backward. With ``d`` the op's local derivative
(``[x > 0]`` for ReLU, ``[lo < x < hi]`` for Hardtanh/ReLU6, ``[lo <= x <= hi]``
for clamp, ``1`` or the negative slope for LeakyReLU/PReLU):

- ``"normal"``: ``g * d`` (the true gradient, as autograd computes it),
- ``"guided"``: ``ReLU(g) * d`` (Guided Backpropagation, Springenberg et al.;
  001 sec. 5.3.4): only positive gradients pass, where the op passes them,
- ``"deconv"``: ``ReLU(g)`` (Zeiler and Fergus' deconvnet; 001 sec. 5.3.4).

The guided and deconv rules are defined for these rectifiers only. A smooth
activation on the differentiated path (GELU, SiLU/Swish, ELU, SELU, CELU,
Mish, Softplus, Hardswish, ...) makes :class:`ReluRouting` raise
:class:`~camserve.errors.UnsupportedMethodError` naming it: passing its
gradient unchanged would present a plain gradient as a guided one. Gates
(sigmoid, tanh, softmax) are not rectifiers and pass their true gradient, as
in other libraries' guided backpropagation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from camserve.errors import UnsupportedMethodError

__all__ = ["RECTIFIERS", "RELU_MODES", "SMOOTH_ACTIVATIONS", "ReluRouting", "ReluState"]

RELU_MODES = ("normal", "guided", "deconv")


@dataclass
class ReluState:
    """Which backward the routed rectifiers use right now (one per call).

    Attributes:
        mode: ``"normal"``, ``"guided"`` or ``"deconv"``.
        routed: rectifier calls routed while grad mode was on (on the
            differentiated path), by name.
    """

    mode: str = "normal"
    routed: dict[str, int] = field(default_factory=dict)


class _SwitchReLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        state: ReluState,
        inplace: bool,
        apply: Callable[[Tensor, bool], Tensor],
        derivative: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        # derivative None: ReLU, whose derivative [x > 0] is [out > 0] (no copy of x needed)
        d = derivative(x) if derivative is not None else None
        out = apply(x, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out if d is None else d)
        ctx.relu = d is None
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (saved,) = ctx.saved_tensors
        d = (saved > 0) if ctx.relu else saved
        mode = ctx.state.mode
        if mode == "deconv":
            return grad.clamp(min=0), None, None, None, None
        if mode == "guided":
            grad = grad.clamp(min=0)
        return grad * d.to(grad.dtype), None, None, None, None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


Rule = tuple[Callable[[Tensor, bool], Tensor], Callable[[Tensor], Tensor] | None, bool]
"""(apply(x, inplace), derivative(x) or None for ReLU, inplace)."""


def _relu(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    ip = inplace or bool(_arg(args, kw, 1, "inplace", False))
    return (lambda x, i: x.clamp_(min=0) if i else x.clamp(min=0)), None, ip


def _bounded(lo: Any, hi: Any, inclusive: bool, ip: bool) -> Rule:
    def apply(x: Tensor, i: bool) -> Tensor:
        return x.clamp_(lo, hi) if i else x.clamp(lo, hi)

    def derivative(x: Tensor) -> Tensor:
        d = torch.ones_like(x, dtype=torch.bool)
        if lo is not None:
            d &= (x >= lo) if inclusive else (x > lo)
        if hi is not None:
            d &= (x <= hi) if inclusive else (x < hi)
        return d

    return apply, derivative, ip


def _hardtanh(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    lo = _arg(args, kw, 1, "min_val", -1.0)
    hi = _arg(args, kw, 2, "max_val", 1.0)
    return _bounded(lo, hi, False, inplace or bool(_arg(args, kw, 3, "inplace", False)))


def _relu6(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    return _bounded(0.0, 6.0, False, inplace or bool(_arg(args, kw, 1, "inplace", False)))


def _clamp(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    lo = _arg(args, kw, 1, "min", None)
    hi = _arg(args, kw, 2, "max", None)
    return _bounded(lo, hi, True, inplace)


def _clamp_min(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    return _bounded(_arg(args, kw, 1, "min", None), None, True, inplace)


def _clamp_max(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    return _bounded(None, _arg(args, kw, 1, "max", None), True, inplace)


def _sloped(slope: Any, ip: bool) -> Rule:
    def apply(x: Tensor, i: bool) -> Tensor:
        y = torch.where(x > 0, x, x * slope)
        return x.copy_(y) if i else y

    def derivative(x: Tensor) -> Tensor:
        return torch.where(x > 0, torch.ones_like(x), torch.zeros_like(x) + slope)

    return apply, derivative, ip


def _leaky(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    slope = _arg(args, kw, 1, "negative_slope", 0.01)
    return _sloped(slope, inplace or bool(_arg(args, kw, 2, "inplace", False)))


def _prelu(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    weight = _arg(args, kw, 1, "weight", None).detach()
    x = args[0] if args else kw["input"]
    if weight.numel() > 1 and x.dim() >= 2:  # one slope per channel (dim 1)
        weight = weight.reshape(1, -1, *([1] * (x.dim() - 2)))
    return _sloped(weight, False)


def _rrelu(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule | None:
    if bool(_arg(args, kw, 3, "training", False)):
        return None  # random slopes: refused below
    lower = _arg(args, kw, 1, "lower", 1.0 / 8)
    upper = _arg(args, kw, 2, "upper", 1.0 / 3)
    return _sloped((lower + upper) / 2, inplace or bool(_arg(args, kw, 4, "inplace", False)))


def _threshold(args: tuple[Any, ...], kw: dict[str, Any], inplace: bool) -> Rule:
    th = _arg(args, kw, 1, "threshold", 0.0)
    value = _arg(args, kw, 2, "value", 0.0)
    ip = inplace or bool(_arg(args, kw, 3, "inplace", False))

    def apply(x: Tensor, i: bool) -> Tensor:
        y = torch.where(x > th, x, torch.full_like(x, value))
        return x.copy_(y) if i else y

    return apply, (lambda x: x > th), ip


_Parser = Callable[[tuple[Any, ...], dict[str, Any], bool], Rule | None]

_RULES: dict[Any, tuple[str, _Parser, bool]] = {
    F.relu: ("ReLU", _relu, False),
    torch.relu: ("ReLU", _relu, False),
    Tensor.relu: ("ReLU", _relu, False),
    torch.relu_: ("ReLU", _relu, True),
    Tensor.relu_: ("ReLU", _relu, True),
    F.relu_: ("ReLU", _relu, True),
    F.relu6: ("ReLU6", _relu6, False),
    F.hardtanh: ("Hardtanh", _hardtanh, False),
    F.hardtanh_: ("Hardtanh", _hardtanh, True),
    torch.clamp: ("clamp", _clamp, False),
    torch.clip: ("clamp", _clamp, False),
    Tensor.clamp: ("clamp", _clamp, False),
    Tensor.clip: ("clamp", _clamp, False),
    torch.clamp_: ("clamp", _clamp, True),
    torch.clip_: ("clamp", _clamp, True),
    Tensor.clamp_: ("clamp", _clamp, True),
    Tensor.clip_: ("clamp", _clamp, True),
    torch.clamp_min: ("clamp", _clamp_min, False),
    Tensor.clamp_min: ("clamp", _clamp_min, False),
    torch.clamp_min_: ("clamp", _clamp_min, True),
    Tensor.clamp_min_: ("clamp", _clamp_min, True),
    torch.clamp_max: ("clamp", _clamp_max, False),
    Tensor.clamp_max: ("clamp", _clamp_max, False),
    torch.clamp_max_: ("clamp", _clamp_max, True),
    Tensor.clamp_max_: ("clamp", _clamp_max, True),
    F.leaky_relu: ("LeakyReLU", _leaky, False),
    F.leaky_relu_: ("LeakyReLU", _leaky, True),
    F.prelu: ("PReLU", _prelu, False),
    F.rrelu: ("RReLU", _rrelu, False),
    F.rrelu_: ("RReLU", _rrelu, True),
    F.threshold: ("Threshold", _threshold, False),
    F.threshold_: ("Threshold", _threshold, True),  # type: ignore[attr-defined]
}
RECTIFIERS = tuple(sorted({name for name, _, _ in _RULES.values()}))
"""The activations the guided and deconv rules are applied to."""

_SMOOTH: dict[Any, str] = {
    F.gelu: "GELU",
    F.silu: "SiLU (Swish)",
    F.elu: "ELU",
    F.elu_: "ELU",
    F.selu: "SELU",
    torch.selu: "SELU",
    torch.selu_: "SELU",
    F.celu: "CELU",
    torch.celu: "CELU",
    torch.celu_: "CELU",
    F.mish: "Mish",
    F.softplus: "Softplus",
    F.hardswish: "Hardswish",
    F.logsigmoid: "LogSigmoid",
    F.softsign: "Softsign",
    F.tanhshrink: "Tanhshrink",
}
SMOOTH_ACTIVATIONS = tuple(sorted(set(_SMOOTH.values())))
"""Activations for which the guided and deconv rules are undefined (refused)."""


class ReluRouting(TorchFunctionMode):
    """Routes every rectifier call of the enclosed forward to :class:`_SwitchReLU`.

    Raises (from the forward):
        UnsupportedMethodError: a smooth activation (:data:`SMOOTH_ACTIVATIONS`)
            or RReLU in training mode runs with grad mode on, i.e. on the path
            that the guided or deconv backward goes through.
    """

    def __init__(self, state: ReluState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            name, parse, inplace = rule
            x = args[0] if args else kwargs.get("input", kwargs.get("self"))
            if isinstance(x, Tensor) and x.is_floating_point():
                if not torch.is_grad_enabled():
                    return func(*args, **kwargs)
                parsed = parse(args, kwargs, inplace)
                if parsed is None:
                    raise _undefined(f"{name} in training mode (random slopes)")
                self.state.routed[name] = self.state.routed.get(name, 0) + 1
                apply, derivative, ip = parsed
                return _SwitchReLU.apply(x, self.state, ip, apply, derivative)  # type: ignore[no-untyped-call]
        smooth = _SMOOTH.get(func)
        if smooth is not None and torch.is_grad_enabled():
            raise _undefined(f"{smooth} (torch.nn.functional.{getattr(func, '__name__', func)})")
        return func(*args, **kwargs)


def _undefined(activation: str) -> UnsupportedMethodError:
    return UnsupportedMethodError(
        f"the guided and deconv rules (guided_backprop, guided_<method>, gradcam_guidedrelu, "
        f"gradcam_deconvrelu) are defined for the ReLU family ({', '.join(RECTIFIERS)}); "
        f"this model applies {activation} on the differentiated path, where they are "
        "undefined; use the methods without the guided rule (gradcam, gradcampp, ...)"
    )

"""Guided and deconv ReLU backward passes without editing the user's model.

While :class:`ReluRouting` is active (thread-local, one call), ``nn.ReLU``
(also ``inplace=True``), ``F.relu``, ``torch.relu``, ``torch.relu_`` and
``Tensor.relu(_)`` run through :class:`_SwitchReLU`. Its forward is ReLU; its
backward follows :attr:`ReluState.mode`, read when the backward runs, so one
forward serves a normal, a guided and a deconv backward:

- ``"normal"``: ``g * [x > 0]`` (the true gradient),
- ``"guided"``: ``ReLU(g) * [x > 0]`` (Guided Backpropagation, Springenberg
  et al.; 001 sec. 5.3.4),
- ``"deconv"``: ``ReLU(g)`` (Zeiler and Fergus' deconvnet; 001 sec. 5.3.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["RELU_MODES", "ReluRouting", "ReluState"]

RELU_MODES = ("normal", "guided", "deconv")


@dataclass
class ReluState:
    """Which backward the routed ReLUs use right now (one per call)."""

    mode: str = "normal"


class _SwitchReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, state: ReluState, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_(min=0)
        else:
            out = x.clamp(min=0)
        ctx.save_for_backward(out)
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (out,) = ctx.saved_tensors
        mode = ctx.state.mode
        if mode == "deconv":
            return grad.clamp(min=0), None, None
        if mode == "guided":
            grad = grad.clamp(min=0)
        return grad * (out > 0).to(grad.dtype), None, None


_OUT_OF_PLACE = {F.relu, torch.relu, Tensor.relu}
_IN_PLACE = {torch.relu_, Tensor.relu_, F.relu_}


class ReluRouting(TorchFunctionMode):
    """Routes every ReLU call of the enclosed forward to :class:`_SwitchReLU`."""

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
        if func in _OUT_OF_PLACE or func in _IN_PLACE:
            inplace = func in _IN_PLACE or bool(kwargs.get("inplace", False))
            if func is F.relu and len(args) > 1:
                inplace = bool(args[1])
            x = args[0] if args else kwargs["input"]
            if isinstance(x, Tensor):
                return _SwitchReLU.apply(x, self.state, inplace)  # type: ignore[no-untyped-call]
        return func(*args, **kwargs)

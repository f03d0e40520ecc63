"""Tiny networks and slow, formula-by-formula references for the engine tests."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GuidedReLUModule",
    "ResNetish",
    "Vqa",
    "gap_net",
    "guided_copy",
    "ref_grad",
    "ref_map",
    "vgg_net",
]


def gap_net(*, bias: bool = True) -> nn.Sequential:
    """Conv trunk (in-place ReLUs) + GAP + linear head: CAM applies at ``features``."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1, bias=bias),
                nn.ReLU(inplace=True),
                nn.Conv2d(6, 8, 3, padding=1, stride=2, bias=bias),
                nn.ReLU(inplace=True),
            ),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, 5, bias=bias),
        )
    ).eval()


def vgg_net() -> nn.Sequential:
    """VGG-like: conv, in-place ReLU, max pool, fully connected head (CAM does not apply)."""
    torch.manual_seed(1)
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Conv2d(6, 8, 3, padding=1),
                nn.ReLU(inplace=True),
            ),
            flat=nn.Flatten(),
            classifier=nn.Sequential(
                nn.Linear(8 * 8 * 8, 16), nn.ReLU(inplace=True), nn.Linear(16, 5)
            ),
        )
    ).eval()


def _relu_call(t: Tensor, style: str) -> Tensor:
    if style == "torch":
        return torch.relu(t)
    if style == "F_inplace":
        return F.relu(t, inplace=True)
    if style == "method_":
        return t.relu_()
    return F.relu(t)


class Block(nn.Module):
    """Residual block with functional ReLUs (in-place and not) and a skip connection."""

    def __init__(self, c: int, owner: ResNetish) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self._owner = [owner]

    def forward(self, x: Tensor) -> Tensor:
        relu = self._owner[0].relu
        out = relu(self.conv1(x), "F_inplace")
        out = self.conv2(out)
        return relu(out + x, "method_")


class ResNetish(nn.Module):
    """Stem + two residual blocks + GAP + linear; ReLUs are functional calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.relu: Callable[[Tensor, str], Tensor] = _relu_call
        self.stem = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.block1 = Block(8, self)
        self.block2 = Block(8, self)
        self.fc = nn.Linear(8, 5)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.stem(x), "torch")
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Vqa(nn.Module):
    """Image features x question embedding -> answer scores (001 sec. 2.3 in miniature)."""

    def __init__(self, answers: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU())
        self.embed = nn.Embedding(10, 8)
        self.out = nn.Linear(8, answers)
        self.eval()

    def forward(self, image: Tensor, question: Tensor) -> Tensor:
        v = self.features(image).mean(dim=(2, 3))
        q = torch.tanh(self.embed(question).mean(dim=1))
        return self.out(v * q)


# ----------------------------------------------------------------- references
class _GuidedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, mode: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.mode = mode
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        if ctx.mode == "deconv":
            return g.clamp(min=0), None
        return g.clamp(min=0) * (x > 0).to(g.dtype), None


class GuidedReLUModule(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return _GuidedFn.apply(x, self.mode)


def guided_copy(model: nn.Module, mode: str) -> nn.Module:
    """A copy of ``model`` whose ReLUs have a guided (or deconv) backward."""
    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, GuidedReLUModule(mode))
        del name
    if isinstance(clone, ResNetish):
        clone.relu = lambda t, style: _GuidedFn.apply(t, mode)
    return clone


def ref_grad(
    model: nn.Module,
    layer: str,
    x: Tensor,
    score: Callable[[Any], Tensor],
    extras: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Activation, d score/d activation and the score, by a plain hook and one backward.

    The layer output is replaced by a fresh leaf that requires grad (the
    forward runs with gradients from the input on), so the reference shares
    no code with the engine.
    """
    store: dict[str, Tensor] = {}
    module = model.get_submodule(layer)

    def hook(m: nn.Module, args: Any, out: Tensor) -> Tensor:
        leaf = out.detach().clone().requires_grad_()
        store["a"] = leaf
        return leaf * 1.0

    h = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            s = score(model(x, *extras))
            (g,) = torch.autograd.grad(s, store["a"], allow_unused=True)
    finally:
        h.remove()
    a = store["a"].detach()
    return a, (torch.zeros_like(a) if g is None else g), s.detach()


def ref_map(method: str, a: Tensor, g: Tensor, g_logit: Tensor | None = None) -> Tensor:
    """One map from the formulas, channel by channel (``a``, ``g``: ``(C, h, w)``)."""
    a, g = a.double(), g.double()
    gl = g if g_logit is None else g_logit.double()
    c = a.shape[0]
    total = torch.zeros(a.shape[1:], dtype=torch.float64)
    for k in range(c):
        gk, ak = g[k], a[k]
        if method in ("gradcam", "gradcam_norelu"):
            total += gk.mean() * ak
        elif method == "gradcam_pos":
            total += gk.clamp(min=0).mean() * ak
        elif method == "gradcam_abs":
            total += gk.abs().mean() * ak
        elif method == "gradcam_gmp":
            total += gk.max() * ak
        elif method == "counterfactual":
            total += -gk.mean() * ak
        elif method == "xgradcam":
            s = ak.sum()
            total += ((ak / s) * gk).sum() * ak if s != 0 else 0.0 * ak
        elif method == "layercam":
            total += gk.clamp(min=0) * ak
        elif method == "hirescam":
            total += gk * ak
        elif method == "gradcampp":  # 002 eq. 9 and eq. 4
            glk = gl[k]
            num = glk**2
            den = 2 * glk**2 + ak.sum() * glk**3
            alpha = torch.where(
                glk != 0, num / torch.where(den != 0, den, torch.ones_like(den)), 0.0
            )
            total += (alpha * gk.clamp(min=0)).sum() * ak
        else:
            raise KeyError(method)
    return total if method == "gradcam_norelu" else total.clamp(min=0)

"""Batched vector-Jacobian products and the callables handed to re-running methods.

Re-running methods (Ablation-CAM, Score-CAM, occlusion, Integrated Gradients,
Gradient SHAP) are pure; the engine hands them, per call:

- ``tail(i, acts (B, C, h, w)) -> (B, K)``: image i's K target scores with the
  layer's activation replaced, running only the part of the network after the
  layer (a ``torch.fx`` cut; a full re-run with a replacing hook when the
  model cannot be traced);
- ``score(i, x (B, ...)) -> (B, K)``: a full forward on variants of image i;
- ``input_grad(i, x (B, ...)) -> (scores (B, K), grads (B, K, *x.shape[1:]))``.

Other model inputs (question tokens, caption tokens) are image i's, repeated
along the batch dimension. Results are finite (NaN -> 0, inf -> dtype max).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine._numerics import finite
from camserve.engine.graph import SplitModel
from camserve.engine.hooks import ReplaceOutput
from camserve.engine.targets import Target

__all__ = ["Runner", "batched_vjp"]


def batched_vjp(scores: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of each of the K columns of ``scores (B, K)`` w.r.t. ``inputs``, in one backward.

    The K one-hot cotangents go through the graph together
    (``is_grads_batched``, a vmapped vector-Jacobian product); if an op has
    no batching rule, a loop over the K targets gives the same result.
    The graph is kept, so several backward passes may follow one forward.

    Returns:
        One tensor ``(B, K, *input.shape[1:])`` per input (zeros where unused).
    """
    b, k = scores.shape
    if not scores.requires_grad or not inputs:
        return [
            torch.zeros(x.shape[0], k, *x.shape[1:], dtype=x.dtype, device=x.device) for x in inputs
        ]
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grads: Sequence[Tensor | None]
    if k == 1:
        grads = [
            None if g is None else g[None]
            for g in torch.autograd.grad(
                scores, inputs, torch.ones_like(scores), retain_graph=True, allow_unused=True
            )
        ]
    else:
        cotangents = eye[:, None, :].expand(k, b, k)
        try:
            grads = torch.autograd.grad(
                scores,
                inputs,
                cotangents,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except (
            RuntimeError,
            NotImplementedError,
            UserWarning,
        ):  # no batching rule: loop over targets
            per_target = [
                torch.autograd.grad(
                    scores, inputs, cotangents[j], retain_graph=True, allow_unused=True
                )
                for j in range(k)
            ]
            grads = [
                None if per_target[0][i] is None else torch.stack([pt[i] for pt in per_target])
                for i in range(len(inputs))
            ]
    out = []
    for x, g in zip(inputs, grads, strict=True):
        if g is None:
            out.append(torch.zeros(x.shape[0], k, *x.shape[1:], dtype=x.dtype, device=x.device))
        else:
            out.append(finite(g.transpose(0, 1)))
    return out


def _repeat(value: Any, i: int, b: int, n: int) -> Any:
    """Row i of a batch-first tensor, repeated b times; anything else as it is."""
    if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return value[i : i + 1].expand(b, *value.shape[1:]).contiguous()
    return value


def _target_rows(head: nn.Linear, ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """The rows ``ids`` of ``head``'s weight and bias, zero-padded to a multiple of 8 rows.

    The padding keeps the product a matrix-matrix one for every K: with one
    target row the CPU takes a matrix-vector kernel whose rounding differs
    from the full head's (3.7e-7 on a 2048x1000 head), while the padded rows
    gave the full head's values bit for bit for K = 1..13 (torch 2.14, 2
    threads). The zero rows cost next to nothing and are sliced off.
    """
    ids = ids.to(head.weight.device)
    k = int(ids.shape[0])
    padded = -(-k // 8) * 8
    weight = head.weight.new_zeros((padded, head.weight.shape[1]))
    weight[:k] = head.weight[ids]
    if head.bias is None:
        return weight, None
    bias = head.bias.new_zeros(padded)
    bias[:k] = head.bias[ids]
    return weight, bias


@dataclass
class Runner:
    """Builds the re-run callables of one call (see the module docstring).

    Attributes:
        model: the user's model.
        inputs: the call's model inputs (the image batch first).
        target: the call's targets.
        split: the fx-cut model, or None.
        frontier: values recorded in the forward for the fx tails.
        restrict_head: let ``tail`` evaluate a final ``nn.Linear`` only on the
            K target rows (see :meth:`tail`); False computes every output.
    """

    model: nn.Module
    inputs: tuple[Tensor, ...]
    target: Target
    split: SplitModel | None
    frontier: tuple[Any, ...] | None
    restrict_head: bool = True

    @property
    def n(self) -> int:
        return int(self.inputs[0].shape[0])

    def _rows(self, i: int, b: int) -> Tensor:
        return torch.full((b,), i, dtype=torch.long, device=self.inputs[0].device)

    def _forward(self, i: int, x: Tensor) -> Any:
        b = x.shape[0]
        return self.model(x, *(_repeat(e, i, b, self.n) for e in self.inputs[1:]))

    def uses_fx(self, layer: str) -> bool:
        """Whether ``tail`` for ``layer`` runs only the part after the layer."""
        return self.split is not None and self.frontier is not None and layer in self.split.cuts

    def tail(self, layer: str) -> Callable[[int, Tensor], Tensor]:
        """``tail(i, acts)``: target scores of image i with ``layer``'s output replaced.

        When the fx tail ends in an ``nn.Linear`` whose output is the model
        output and the targets are class logits (``score="logit"``, no score
        function), only the K target rows of that Linear are evaluated:
        ``F.linear(features, W[ids], b[ids])`` equals ``Linear(features)[:, ids]``
        (the same dot products) at K/C of the cost. On a ResNet-50 after
        ``layer4`` this is the 2048x1000 classifier applied to every ablated
        copy, as much work as the whole forward. ``restrict_head=False``
        computes every output.
        """
        split, frontier = self.split, self.frontier
        target = self.target
        head = split.head(layer) if split is not None and layer in split.cuts else None
        if (
            self.restrict_head
            and split is not None
            and frontier is not None
            and head is not None
            and target.fn is None
            and target.score == "logit"
        ):
            rows: dict[int, tuple[Tensor, Tensor | None]] = {}

            def head_tail(i: int, acts: Tensor) -> Tensor:
                b = acts.shape[0]
                values = [_repeat(v, i, b, self.n) for v in frontier]
                with torch.no_grad():
                    feats = split.tail_features(layer, acts, values)
                    if i not in rows:
                        rows[i] = _target_rows(head, target.ids[i])
                    weight, bias = rows[i]
                    return finite(F.linear(feats, weight, bias)[:, : target.k])

            return head_tail
        if split is not None and frontier is not None and layer in split.cuts:

            def fx_tail(i: int, acts: Tensor) -> Tensor:
                b = acts.shape[0]
                values = [_repeat(v, i, b, self.n) for v in frontier]
                with torch.no_grad():
                    out = split.tail(layer, acts, values)
                    return finite(self.target.scores(out, self._rows(i, b)))

            return fx_tail
        module = self.model.get_submodule(layer)

        def rerun_tail(i: int, acts: Tensor) -> Tensor:
            b = acts.shape[0]
            x = _repeat(self.inputs[0], i, b, self.n)
            with torch.no_grad(), ReplaceOutput(module) as replace:
                replace.value = acts
                out = self._forward(i, x)
                return finite(self.target.scores(out, self._rows(i, b)))

        return rerun_tail

    def score(self, i: int, x: Tensor) -> Tensor:
        """Target scores ``(B, K)`` of image i's targets on the B variants ``x``."""
        with torch.no_grad():
            out = self._forward(i, x)
            return finite(self.target.scores(out, self._rows(i, x.shape[0])))

    def input_grad(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``(B, K)`` and input gradients ``(B, K, *x.shape[1:])``, one batched backward."""
        xg = x.detach().requires_grad_()
        with torch.enable_grad():
            scores = self.target.scores(self._forward(i, xg), self._rows(i, x.shape[0]))
            (grads,) = batched_vjp(scores, [xg])
        return finite(scores.detach()), grads

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
along the batch dimension. Scores that are not finite raise
:class:`~camserve.engine.outputs.NonFiniteOutputError` (a model failure, never
zeros).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine._numerics import finite
from camserve.engine.graph import SplitModel
from camserve.engine.hooks import ReplaceOutput
from camserve.engine.outputs import NonFiniteOutputError, leaves
from camserve.engine.targets import Target
from camserve.errors import UnsupportedMethodError

__all__ = ["Runner", "batched_vjp", "compare_outputs"]


def batched_vjp(
    scores: Tensor, inputs: Sequence[Tensor], names: Sequence[str] | None = None
) -> list[Tensor]:
    """Gradients of each of the K columns of ``scores (B, K)`` w.r.t. ``inputs``, in one backward.

    The K one-hot cotangents go through the graph together
    (``is_grads_batched``, a vmapped vector-Jacobian product); if an op has
    no batching rule, a loop over the K targets gives the same result.
    The graph is kept, so several backward passes may follow one forward.

    Args:
        scores: ``(B, K)`` scores.
        inputs: tensors the scores were computed from.
        names: what each input is, for messages (``"layer 'layer4'"``).

    Returns:
        One tensor ``(B, K, *input.shape[1:])`` per input.

    Raises:
        UnsupportedMethodError: the scores do not depend on an input through
            autograd (the model's forward detaches it, or runs under
            ``torch.no_grad``): a gradient would be missing, never zeros.
        NonFiniteOutputError: a gradient is NaN (a model failure, never zeros);
            infinite gradients are clipped to the dtype's largest values.
    """
    b, k = scores.shape
    if not inputs:
        return []
    labels = list(names) if names is not None else [f"input {i}" for i in range(len(inputs))]
    if not scores.requires_grad:
        raise _no_gradient(labels[: len(inputs)])
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
    unused = [label for label, g in zip(labels, grads, strict=False) if g is None]
    if unused:
        raise _no_gradient(unused)
    out = [g.transpose(0, 1) for g in grads if g is not None]
    for label, g in zip(labels, out, strict=False):
        if g.is_floating_point() and bool(torch.isnan(g).any()):
            rows = torch.isnan(g).reshape(b, -1).any(dim=1).nonzero().flatten().tolist()
            raise NonFiniteOutputError(
                f"the gradients of the target scores with respect to {label} are NaN for "
                f"images {rows} (the model's backward is not defined there)",
                tuple(rows),
            )
    return [finite(g) for g in out]


def _no_gradient(what: Sequence[str]) -> UnsupportedMethodError:
    return UnsupportedMethodError(
        f"the target scores do not depend on {', '.join(what)} through autograd (the model's "
        "forward detaches it, leaves torch, or runs under torch.no_grad / inference_mode), so "
        "its gradients are unavailable; use a method without gradients (ablationcam, scorecam, "
        "occlusion) or a model whose forward keeps the graph"
    )


def _checked(scores: Tensor, name: str, i: int, what: str) -> Tensor:
    """``scores`` of image i's variants, or NonFiniteOutputError when any is NaN or inf."""
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteOutputError(
            f"model {name!r} gave non-finite target scores for image {i} during {what}; "
            "no map is computed from them",
            (i,),
        )
    return scores


def _structure(value: Any) -> Any:
    """The types of a nested output, tensors replaced by their shapes."""
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, Mapping):
        return (type(value), tuple((k, _structure(v)) for k, v in value.items()))
    if isinstance(value, tuple | list):
        return (type(value), tuple(_structure(v) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value),
            tuple(_structure(getattr(value, f.name)) for f in dataclasses.fields(value)),
        )
    return type(value)


def compare_outputs(got: Any, want: Any, what: str) -> str:
    """``""`` when two model outputs agree in structure and values, else how they differ.

    Float tensors must agree to a tolerance of their dtype's precision
    (``1000 eps`` for float32/64, ``8 eps`` for float16/bfloat16, relative to
    the largest value); others exactly.
    """
    if _structure(got) != _structure(want):
        return f"{what} gives outputs structured as {_structure(got)}, the model {_structure(want)}"
    for (path, c), (_, w) in zip(leaves(got), leaves(want), strict=True):
        if not c.is_floating_point():
            same = bool(torch.equal(c, w))
        else:
            eps = float(torch.finfo(c.dtype).eps)
            tol = 1e3 * eps if eps < 1e-6 else 8 * eps  # float32/64; float16/bfloat16
            top = float(w.detach().abs().max()) if w.numel() else 0.0
            same = bool(torch.allclose(c, w, rtol=tol, atol=tol * (1.0 + top)))
        if not same:
            return (
                f"{what} does not reproduce the model's {path} (it reads values computed "
                "for the call's batch size, or runs differently when traced)"
            )
    return ""


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
        name: the model's name (messages).
        fallback: layers whose fx cut must not be used (not proven to
            reproduce the model): their ``tail`` re-runs the whole model.
    """

    model: nn.Module
    inputs: tuple[Tensor, ...]
    target: Target
    split: SplitModel | None
    frontier: tuple[Any, ...] | None
    restrict_head: bool = True
    name: str = "model"
    fallback: frozenset[str] = frozenset()

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
        return (
            self.split is not None
            and self.frontier is not None
            and layer in self.split.cuts
            and layer not in self.fallback
        )

    def check_cut(self, layer: str, act: Tensor) -> str:
        """Whether the fx cut after ``layer`` reproduces the model; the reason when it does not.

        The cut (fed the frontier values of image 0) and the whole model (with
        the layer's output replaced) run on the same activations, image 0's
        ``act (1, ...)`` scaled by 1, 1/2 (and 1/4), at a batch size other than
        the call's, so values the cut recorded for the call's batch size (a
        ``bs = x.size(0)`` read before the layer) show up. Every output tensor
        must agree (to a tolerance of the dtype's precision).

        Returns:
            ``""`` when it reproduces the model, else why not.
        """
        split, frontier = self.split, self.frontier
        if split is None or frontier is None or layer not in split.cuts:
            return "no fx cut"
        b = 3 if self.n == 2 else 2
        scale = torch.tensor([1.0, 0.5, 0.25][:b], dtype=act.dtype, device=act.device)
        acts = act.expand(b, *act.shape[1:]) * scale.reshape(b, *([1] * (act.dim() - 1)))
        module = self.model.get_submodule(layer)
        try:
            with torch.no_grad():
                values = [_repeat(v, 0, b, self.n) for v in frontier]
                cut = split.tail(layer, acts, values)
                with ReplaceOutput(module) as replace:
                    replace.value = acts
                    whole = self._forward(0, _repeat(self.inputs[0], 0, b, self.n))
        except Exception as exc:  # a cut that cannot run is not used
            return f"its torch.fx cut fails at batch size {b} ({type(exc).__name__}: {exc})"
        return compare_outputs(
            cut, whole, f"its torch.fx cut at batch size {b} (other than the call's)"
        )

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
        if layer in self.fallback:
            split = None
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
                    return _checked(
                        F.linear(feats, weight, bias)[:, : target.k], self.name, i, "Ablation-CAM"
                    )

            return head_tail
        if split is not None and frontier is not None and layer in split.cuts:

            def fx_tail(i: int, acts: Tensor) -> Tensor:
                b = acts.shape[0]
                values = [_repeat(v, i, b, self.n) for v in frontier]
                with torch.no_grad():
                    out = split.tail(layer, acts, values)
                    scores = self.target.scores(out, self._rows(i, b))
                    return _checked(scores, self.name, i, "Ablation-CAM")

            return fx_tail
        module = self.model.get_submodule(layer)

        def rerun_tail(i: int, acts: Tensor) -> Tensor:
            b = acts.shape[0]
            x = _repeat(self.inputs[0], i, b, self.n)
            with torch.no_grad(), ReplaceOutput(module) as replace:
                replace.value = acts
                out = self._forward(i, x)
                scores = self.target.scores(out, self._rows(i, b))
                return _checked(scores, self.name, i, "Ablation-CAM")

        return rerun_tail

    def score(self, i: int, x: Tensor) -> Tensor:
        """Target scores ``(B, K)`` of image i's targets on the B variants ``x``."""
        with torch.no_grad():
            out = self._forward(i, x)
            scores = self.target.scores(out, self._rows(i, x.shape[0]))
            return _checked(scores, self.name, i, "a re-run on masked inputs")

    def input_grad(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``(B, K)`` and input gradients ``(B, K, *x.shape[1:])``, one batched backward."""
        xg = x.detach().requires_grad_()
        with torch.enable_grad():
            scores = self.target.scores(self._forward(i, xg), self._rows(i, x.shape[0]))
            _checked(scores.detach(), self.name, i, "a re-run on reference inputs")
            (grads,) = batched_vjp(scores, [xg], ["the input"])
        return scores.detach(), grads

"""The :class:`Explainer`: predictions and every map from one forward and one backward.

One call runs the model once under :func:`torch.no_grad`; a forward hook on
the earliest requested layer turns its output into a leaf that requires grad,
so the graph covers only the part of the network after the layer. One
batched vector-Jacobian product (the K one-hot target cotangents together)
then gives the gradients of every target at every layer, from which every
gradient method is a pure function. Guided-ReLU / deconv-ReLU variants reuse
the same forward with a second (third) backward; guided backprop extends the
graph to the input. Re-running methods get callables that re-run only what
they must (see :mod:`camserve.engine.runners`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from camserve.engine._numerics import finite
from camserve.engine.explanation import INPUT_LAYER, Explanation
from camserve.engine.graph import SplitModel, find_cam_head, trace_split
from camserve.engine.hooks import LayerCapture
from camserve.engine.methods import (
    GRADIENT_METHODS,
    INPUT_METHODS,
    LAYER_METHODS,
    RERUN_METHODS,
    GradKind,
    check_options,
    list_methods,
    rerun_function,
)
from camserve.engine.methods.activation import cam
from camserve.engine.methods.gradient import gradcampp
from camserve.engine.methods.guided import guided_backprop, guided_product
from camserve.engine.relu import ReluRouting, ReluState
from camserve.engine.runners import Runner, batched_vjp
from camserve.engine.targets import Target, Targets, resolve_targets
from camserve.engine.timing import Stopwatch
from camserve.errors import InvalidRequestError, UnknownNameError, UnsupportedMethodError

__all__ = ["Explainer"]

Inputs = Tensor | Sequence[Tensor]


class Explainer:
    """Explains a model's predictions at one or more layers.

    Example:
        >>> ex = Explainer(model, "layer4")  # doctest: +SKIP
        >>> res = ex.explain(images, methods=("gradcam", "gradcampp"), targets=5)  # doctest: +SKIP
        >>> res.map("gradcam").shape  # (N, 5, h, w)  # doctest: +SKIP

    The model is used as it is: its mode (call ``model.eval()`` for inference),
    hooks, parameters and ``requires_grad`` flags are left untouched; hooks of
    this class exist only during a call and act only for the calling thread,
    so one Explainer may serve concurrent calls.

    Args:
        model: a PyTorch module; ``model(*inputs)`` gives the output to explain.
        layer: module path(s) as in ``model.named_modules()`` (``"layer4"``,
            ``"features.29"``), or a list of them.
        device: where inputs are moved; the model must already be there
            (default: the device of the model's parameters, else the CPU).
        batch_size: batch size of the re-running methods (Ablation-CAM,
            Score-CAM, occlusion); ``options`` may override it per method.
        trace: cut the model with ``torch.fx`` at construction so Ablation-CAM
            re-runs only the part after the layer. Tracing patches
            ``nn.Module.__call__`` while it runs, so it happens here, once, not
            during calls. When it fails, Ablation-CAM re-runs the whole model
            with the layer's output replaced (same result, more work).
        restrict_head: when the traced part after the layer ends in an
            ``nn.Linear`` giving the model output and the targets are class
            logits, Ablation-CAM evaluates that Linear only on the K target
            rows instead of every class (same maps; on a ResNet-50 after
            ``layer4`` it saves as much work as a whole forward per image).
            False computes every class (for comparison).

    Raises:
        UnknownNameError: a layer that is not a module of the model.
        InvalidRequestError: an empty layer list, a bad batch size, or a model
            whose parameters are not on ``device``.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | Sequence[str],
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        trace: bool = True,
        restrict_head: bool = True,
    ) -> None:
        names = [layer] if isinstance(layer, str) else list(layer)
        if not names:
            raise InvalidRequestError("at least one layer is needed")
        modules = dict(model.named_modules())
        for name in names:
            if not isinstance(name, str) or name not in modules or name == "":
                raise UnknownNameError("layer", name, [n for n in modules if n])
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"layers must be distinct, got {names}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidRequestError(f"batch_size must be a positive int, got {batch_size!r}")
        params = list(model.parameters())
        self.device = (
            torch.device(device)
            if device is not None
            else (params[0].device if params else torch.device("cpu"))
        )
        wrong = {str(p.device) for p in params if p.device.type != self.device.type}
        if wrong:
            raise InvalidRequestError(
                f"the model's parameters are on {sorted(wrong)}, not on device {self.device}; "
                "move the model first"
            )
        self.model = model
        self.layers: tuple[str, ...] = tuple(names)
        self.batch_size = batch_size
        self.restrict_head = restrict_head
        self._dtype = params[0].dtype if params else None
        self._split: SplitModel | None = None
        self.trace_note = "tracing disabled"
        if trace:
            self._split, self.trace_note = trace_split(model, names)

    # ------------------------------------------------------------------ inputs
    def _inputs(self, inputs: Inputs) -> tuple[Tensor, ...]:
        xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        if not xs or not all(isinstance(x, Tensor) for x in xs):
            raise InvalidRequestError(
                "inputs must be a Tensor (N, C, H, W) or a tuple of tensors, "
                f"got {type(inputs).__name__}"
            )
        x = xs[0]
        if x.dim() != 4:
            raise InvalidRequestError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InvalidRequestError(f"images must be a float tensor, got dtype {x.dtype}")
        if self._dtype is not None and x.dtype != self._dtype:
            raise InvalidRequestError(
                f"images have dtype {x.dtype}, the model's parameters {self._dtype}"
            )
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise InvalidRequestError(f"empty batch or image: shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise InvalidRequestError("images contain NaN or inf")
        for j, e in enumerate(xs[1:], start=1):
            if e.dim() == 0 or e.shape[0] != x.shape[0]:
                raise InvalidRequestError(
                    f"extra input {j} must share the batch size {x.shape[0]} in dim 0, "
                    f"got shape {tuple(e.shape)}"
                )
        return tuple(t.detach().to(self.device) for t in xs)

    @staticmethod
    def _methods(methods: str | Sequence[str]) -> list[str]:
        ids = [methods] if isinstance(methods, str) else list(methods)
        if not ids:
            raise InvalidRequestError(
                f"at least one method is needed; valid methods: {', '.join(list_methods())}"
            )
        known = list_methods()
        for m in ids:
            if m not in known:
                raise UnknownNameError("method", m, known)
        return list(dict.fromkeys(ids))

    # --------------------------------------------------------------- explain
    def explain(
        self,
        inputs: Inputs,
        methods: str | Sequence[str] = ("gradcam",),
        targets: Targets = 1,
        score: str = "logit",
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Explanation:
        """Predict and explain ``targets`` with every method in ``methods``.

        Args:
            inputs: images ``(N, C, H, W)``, or a tuple whose first tensor is the
                images and the rest extra model inputs sharing dim 0;
                ``model(*inputs)`` is called.
            methods: method ids (see :func:`~camserve.engine.list_methods`).
            targets: ``k`` (top-k classes), per-image class ids
                (``list[list[int]]`` or LongTensor ``(N, K)``), or a
                :data:`~camserve.engine.targets.ScoreFn`.
            score: ``"logit"`` (pre-softmax, default) or ``"probability"``
                (post-softmax, 002 footnote 1); ignored for a score function.
                Grad-CAM++'s alphas always use the pre-softmax score's gradient
                (002 eq. 9); with probabilities its weights use ReLU of the
                probability's gradient (002 eq. 4).
            options: method id -> keyword options (``{"gradcampp":
                {"normalize_alpha": True}}``, ``{"occlusion": {"mask": 35}}``).
                ``{"gradcampp": {"stats": True}}`` fills ``stats["gradcampp"]``
                (and ``stats["gradcampp@<layer>"]``) with the alpha statistics
                of 002 Fig. 3-4; they are not computed otherwise.

        Raises:
            UnknownNameError: unknown method, option, score kind or class id.
            InvalidRequestError: bad shapes, dtypes, k, or option values.
            UnsupportedMethodError: ``cam`` without a GAP + linear head.
        """
        watch = Stopwatch(self.device)
        with watch.stage("total"):
            xs = self._inputs(inputs)
            requested = self._methods(methods)
            opts = check_options(options)
            result = self._explain(xs, requested, targets, score, opts, watch)
        result.timings.update(watch.result())
        return result

    def _explain(
        self,
        xs: tuple[Tensor, ...],
        requested: list[str],
        targets: Targets,
        score: str,
        opts: dict[str, dict[str, Any]],
        watch: Stopwatch,
    ) -> Explanation:
        guided_ids = [m for m in requested if m.startswith("guided_")]
        layer_ids = list(
            dict.fromkeys(
                [m for m in requested if m in LAYER_METHODS]
                + [m[7:] for m in guided_ids if m != "guided_backprop"]
            )
        )
        kinds: set[GradKind] = {GRADIENT_METHODS[m][1] for m in layer_ids if m in GRADIENT_METHODS}
        if "gradcampp" in layer_ids:
            kinds.add("normal")
        input_guided = bool(guided_ids)
        relu = input_guided or bool(kinds & {"guided", "deconv"})
        use_fx = "ablationcam" in layer_ids and self._split is not None and bool(self._split.cuts)

        # ---- one forward
        state = ReluState()
        images = xs[0].detach().requires_grad_() if input_guided else xs[0]
        capture = LayerCapture(self.model, self.layers, grad=bool(kinds) or input_guided)
        frontier: tuple[Any, ...] | None = None
        with watch.stage("forward"), ExitStack() as stack:
            stack.enter_context(capture)
            stack.enter_context(torch.enable_grad() if input_guided else torch.no_grad())
            if relu:
                stack.enter_context(ReluRouting(state))
            if use_fx and self._split is not None:
                output, frontier = self._split.recorder(images, *xs[1:])
                frontier = tuple(v.detach() if isinstance(v, Tensor) else v for v in frontier)
            else:
                output = self.model(images, *xs[1:])
            capture.active = False
            missing = capture.missing()
            if missing:
                raise InvalidRequestError(f"layers {missing} did not run in the model's forward")
            with torch.enable_grad():
                target, fn_scores = resolve_targets(
                    targets, output, xs[0].shape[0], score, self.device
                )
                rows = torch.arange(xs[0].shape[0], device=self.device)
                scores = fn_scores if fn_scores is not None else target.scores(output, rows)
                logit_scores = None
                if "gradcampp" in layer_ids and target.fn is None and score == "probability":
                    logit_scores = target.scores(output, rows, kind="logit")
        acts = {name: capture.acts[name] for name in self.layers}

        # ---- one batched backward per gradient kind (normal; guided/deconv only when asked)
        grads: dict[str, dict[str, Tensor]] = {}
        logit_grads: dict[str, Tensor] = {}
        guided_input: Tensor | None = None
        with watch.stage("backward"):
            grad_layers = [acts[name] for name in self.layers]
            for kind in ("normal", "guided", "deconv"):
                want_input = kind == "guided" and input_guided
                if kind not in kinds and not want_input:
                    continue
                state.mode = kind
                ys = (
                    scores
                    if logit_scores is None or kind != "normal"
                    else torch.cat([scores, logit_scores], 1)
                )
                wrt = grad_layers if kind in kinds else []
                res = batched_vjp(ys, [*wrt, images] if want_input else wrt)
                if want_input:
                    guided_input = res.pop()
                k = target.k
                grads[kind] = {name: g[:, :k] for name, g in zip(self.layers, res, strict=False)}
                if kind == "normal" and logit_scores is not None:
                    logit_grads = {
                        name: g[:, k:] for name, g in zip(self.layers, res, strict=False)
                    }
        # Drop the graph now: the re-running methods below must not keep it alive.
        output = _detached(output)
        target_scores = finite(scores.detach().float())
        del scores, logit_scores, fn_scores, grad_layers
        acts = {name: a.detach() for name, a in acts.items()}

        runner = Runner(
            self.model,
            xs,
            target,
            self._split if use_fx else None,
            frontier,
            restrict_head=self.restrict_head,
        )
        maps: dict[str, dict[str, Tensor]] = {name: {} for name in self.layers}
        stats: dict[str, dict[str, float]] = {}
        for li, name in enumerate(self.layers):
            a = acts[name]
            for m in layer_ids:
                with watch.stage(f"method.{m}"):
                    maps[name][m] = self._layer_map(
                        m,
                        name,
                        a,
                        grads,
                        logit_grads,
                        target,
                        output,
                        target_scores,
                        runner,
                        opts,
                        stats,
                        li == 0,
                    )

        if any(m in INPUT_METHODS for m in requested):
            maps[INPUT_LAYER] = self._input_maps(
                requested, maps, guided_input, target_scores, runner, opts, watch
            )
        logits = output if _is_logits(output) else None
        return Explanation(
            output=_finite_tree(output),
            logits=finite(logits.float()) if logits is not None else None,
            probabilities=finite(torch.softmax(logits.float(), dim=1))
            if logits is not None
            else None,
            target_ids=target.ids.to(self.device),
            target_scores=target_scores,
            maps=maps,
            stats=stats,
            timings={"upsample": 0.0},
            layers=self.layers,
            methods=tuple(requested),
            input_size=(int(xs[0].shape[2]), int(xs[0].shape[3])),
        )

    # ------------------------------------------------------------ per method
    def _layer_map(
        self,
        method: str,
        layer: str,
        acts: Tensor,
        grads: dict[str, dict[str, Tensor]],
        logit_grads: dict[str, Tensor],
        target: Target,
        output: Any,
        target_scores: Tensor,
        runner: Runner,
        opts: dict[str, dict[str, Any]],
        stats: dict[str, dict[str, float]],
        first: bool,
    ) -> Tensor:
        if method in GRADIENT_METHODS:
            fn, kind = GRADIENT_METHODS[method]
            return finite(fn(acts, grads[kind][layer]))
        if method == "gradcampp":
            out, st = gradcampp(
                acts, grads["normal"][layer], logit_grads.get(layer), **opts.get(method, {})
            )
            if st:  # only with options={"gradcampp": {"stats": True}}
                stats[f"gradcampp@{layer}"] = st
                if first:
                    stats["gradcampp"] = st
            return finite(out)
        if method == "cam":
            return finite(cam(acts, self._cam_weights(layer, acts, target, output)))
        fn_rerun = rerun_function(method)
        kw = {"batch_size": self.batch_size} | opts.get(method, {})
        if method == "ablationcam":
            return finite(fn_rerun(acts, target_scores, runner.tail(layer), **kw).float())
        if method == "scorecam":
            return finite(fn_rerun(runner.inputs[0], acts, runner.score, **kw).float())
        raise AssertionError(f"unhandled layer method {method}")  # pragma: no cover

    def _cam_weights(self, layer: str, acts: Tensor, target: Target, output: Any) -> Tensor:
        if target.fn is not None:
            raise UnsupportedMethodError(
                "cam explains class scores of a GAP + linear head, not a score function; "
                "use gradcam (equal to cam on such a head) for custom scores"
            )
        weight = find_cam_head(self.model, acts, _detached(output)) if _is_logits(output) else None
        if weight is None:
            raise UnsupportedMethodError(
                f"cam needs a global-average-pooling + linear head right after layer {layer!r}, "
                "and this model's output is not linear in the pooled activations of that layer; "
                "valid choices for this model: the gradient methods (gradcam, xgradcam, ...)"
            )
        ids = target.ids.to(weight.device)
        return weight.detach()[ids]

    def _input_maps(
        self,
        requested: list[str],
        maps: dict[str, dict[str, Tensor]],
        guided_input: Tensor | None,
        target_scores: Tensor,
        runner: Runner,
        opts: dict[str, dict[str, Any]],
        watch: Stopwatch,
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        guided: Tensor | None = None
        if guided_input is not None:
            with watch.stage("method.guided_backprop"):
                guided = guided_backprop(guided_input, **opts.get("guided_backprop", {}))
        images = runner.inputs[0]
        for m in requested:
            if m not in INPUT_METHODS:
                continue
            with watch.stage(f"method.{m}"):
                if m == "guided_backprop" and guided is not None:
                    out[m] = guided
                elif m.startswith("guided_") and guided is not None:
                    out[m] = guided_product(guided, maps[self.layers[0]][m[7:]])
                elif m == "occlusion":
                    kw = {"batch_size": self.batch_size} | opts.get(m, {})
                    out[m] = finite(
                        rerun_function(m)(images, target_scores, runner.score, **kw).float()
                    )
                elif m in RERUN_METHODS:
                    kw = {"batch_size": self.batch_size} | opts.get(m, {})
                    out[m] = finite(rerun_function(m)(images, runner.input_grad, **kw).float())
        return out


def _detached(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, tuple | list):
        return type(output)(_detached(o) for o in output)
    if isinstance(output, dict):
        return {k: _detached(v) for k, v in output.items()}
    return output


def _finite_tree(output: Any) -> Any:
    if isinstance(output, Tensor):
        return finite(output)
    if isinstance(output, tuple | list):
        return type(output)(_finite_tree(o) for o in output)
    if isinstance(output, dict):
        return {k: _finite_tree(v) for k, v in output.items()}
    return output


def _is_logits(output: Any) -> bool:
    return isinstance(output, Tensor) and output.dim() == 2 and output.is_floating_point()

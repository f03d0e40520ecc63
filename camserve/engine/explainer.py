"""The :class:`Explainer`: predictions and every map from one forward and one backward.

One call runs the model once under :func:`torch.no_grad`; a forward hook on
the earliest requested layer turns its output into a leaf that requires grad,
so the graph covers only the part of the network after the layer. One
batched vector-Jacobian product (the K one-hot target cotangents together)
then gives the gradients of every target at every layer, from which every
gradient method is a pure function. Guided-ReLU / deconv-ReLU variants reuse
the same forward with a second (third) backward; guided backprop extends the
graph to the input. Re-running methods get callables that re-run only what
they must (see :mod:`camserve.engine.runners`). Which of these a call needs,
and how each method's function is called, comes from the method registry
(:data:`~camserve.engine.methods.METHOD_SPECS`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from camserve.engine._numerics import finite
from camserve.engine.explanation import INPUT_LAYER, Explanation
from camserve.engine.graph import SplitModel, find_cam_head, trace_split
from camserve.engine.hooks import LayerCapture
from camserve.engine.layout import LayerView, Layout, resolve_view
from camserve.engine.methods import GradKind, MethodSpec, check_options, list_methods, method_spec
from camserve.engine.outputs import check_finite, find_logits, tree_map
from camserve.engine.relu import ReluRouting, ReluState
from camserve.engine.runners import Runner, batched_vjp, compare_outputs
from camserve.engine.targets import Target, Targets, resolve_targets
from camserve.engine.timing import Stopwatch
from camserve.errors import InvalidRequestError, UnknownNameError, UnsupportedMethodError

__all__ = ["Explainer", "LayerArg"]

Inputs = Tensor | Sequence[Tensor]
LayerArg = str | nn.Module | Sequence[str | nn.Module]
"""A layer: its module path (``"layer4"``), the module object, or a list of either."""

_GRAD_KINDS: tuple[GradKind, ...] = ("normal", "guided", "deconv")


def _uncompiled(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to run: the original of a ``torch.compile``\\ d model, refusing other forms.

    Raises:
        UnsupportedMethodError: a submodule compiled with ``torch.compile``,
            or a module compiled in place with ``nn.Module.compile()``.
    """
    note = ""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        model, note = orig, "explained through the original module of the torch.compile'd model"
    for name, module in model.named_modules():
        where = f"submodule {name!r}" if name else "the model"
        if type(module).__name__ == "OptimizedModule" and name:
            raise UnsupportedMethodError(
                f"{where} is compiled with torch.compile; the explanation hooks and the guided "
                "rule need eager execution: pass a model whose submodules are not compiled "
                f"(e.g. set it back to {name}._orig_mod)"
            )
        if getattr(module, "_compiled_call_impl", None) is not None:
            raise UnsupportedMethodError(
                f"{where} was compiled in place (nn.Module.compile()); the explanation hooks and "
                "the guided rule need eager execution: pass an uncompiled copy of the model, or "
                "compile with torch.compile(model) and pass the result (its original module is "
                "explained)"
            )
    return model, note


_MODE_DEPENDENT = (
    nn.modules.batchnorm._NormBase,
    nn.modules.dropout._DropoutNd,
    nn.RReLU,
)


def _mode_dependent(module: nn.Module) -> bool:
    """A module whose output differs in training mode (normalisation statistics, dropout)."""
    if isinstance(module, _MODE_DEPENDENT):
        return True
    if isinstance(module, nn.MultiheadAttention):
        return bool(module.dropout > 0)
    name = type(module).__name__.lower()
    return "droppath" in name or "stochasticdepth" in name or "dropblock" in name


def _layer_names(model: nn.Module, layer: LayerArg) -> list[str]:
    items: list[str | nn.Module] = [layer] if isinstance(layer, str | nn.Module) else list(layer)
    if not items:
        raise InvalidRequestError("at least one layer is needed")
    modules = dict(model.named_modules())
    by_id: dict[int, str] = {}
    for name, module in model.named_modules():
        by_id.setdefault(id(module), name)
    names: list[str] = []
    for item in items:
        if isinstance(item, nn.Module):
            found = by_id.get(id(item))
            if found is None or found == "":
                raise InvalidRequestError(
                    f"layer {type(item).__name__} object is not a submodule of the model"
                    if found is None
                    else "the layer must be a submodule of the model, not the model itself"
                )
            names.append(found)
            continue
        name = item.removeprefix("_orig_mod.") if isinstance(item, str) else item
        if not isinstance(name, str) or name not in modules or name == "":
            raise UnknownNameError("layer", item, [n for n in modules if n])
        names.append(name)
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"layers must be distinct, got {names}")
    return names


class Explainer:
    """Explains a model's predictions at one or more layers.

    Example:
        >>> ex = Explainer(model, "layer4")  # doctest: +SKIP
        >>> res = ex.explain(images, methods=("gradcam", "gradcampp"), targets=5)  # doctest: +SKIP
        >>> res.map("gradcam").shape  # (N, 5, h, w)  # doctest: +SKIP

    The model is used as it is: its hooks, parameters, buffers and
    ``requires_grad`` flags are left untouched; hooks of this class exist only
    during a call and act only for the calling thread, so one Explainer may
    serve concurrent calls. The model must be in eval mode (``model.eval()``):
    a call is refused when a module whose output depends on the mode is in
    training mode (BatchNorm, InstanceNorm with statistics, dropout of any
    kind, RReLU, drop-path / stochastic depth): BatchNorm would update its
    running statistics and fail at batch 1, dropout would make maps random.
    A ``torch.compile``\\ d model is explained through its original module
    (same parameters, eager execution, so hooks and the guided rule apply).

    Args:
        model: a PyTorch module; ``model(*inputs)`` gives the output to explain
            (a tensor, or a tuple, namedtuple, dict, dataclass or
            HuggingFace-style output object holding tensors).
        layer: the layer(s) to explain: module paths as in
            ``model.named_modules()`` (``"layer4"``, ``"features.29"``), module
            objects (``model.layer4``), or a list of either. A layer's output
            is a float tensor ``(N, C, h, w)``, ``(N, h, w, C)`` or tokens
            ``(N, T, C)`` (see ``layout``).
        device: where inputs are moved; the model must already be there
            (default: the device of the model's parameters, else the CPU).
        batch_size: batch size of the re-running methods (Ablation-CAM,
            Score-CAM, occlusion); ``options`` may override it per method.
        trace: cut the model with ``torch.fx`` at construction so Ablation-CAM
            re-runs only the part after the layer. Tracing patches
            ``nn.Module.__call__`` while it runs, so it happens here, once, not
            during calls. A cut is used only once it is proven to reproduce
            the model: on the first call per input shape, the cut and the
            whole model are run on the same activations at a batch size other
            than the call's and must agree; otherwise (and when tracing fails)
            Ablation-CAM re-runs the whole model with the layer's output
            replaced (same result, more work) and :attr:`trace_note` says why.
        restrict_head: when the traced part after the layer ends in an
            ``nn.Linear`` giving the model output and the targets are class
            logits, Ablation-CAM evaluates that Linear only on the K target
            rows instead of every class (same maps; on a ResNet-50 after
            ``layer4`` it saves as much work as a whole forward per image).
            False computes every class (for comparison).
        layout: how layer outputs become activations ``(N, C, h, w)``:
            ``"auto"`` (default; token layers ``(N, T, C)`` with their prefix
            tokens detected, Swin-style ``(N, h, w, C)`` recognised by the
            input's aspect ratio), ``"channels_first"``, ``"channels_last"``, a
            :class:`~camserve.engine.layout.TokenGrid`, or a callable
            rearranging the output; or a mapping layer -> layout. See
            :mod:`camserve.engine.layout`.
        name: the model's name in error messages (default: its class name).

    Attributes:
        trace_note: why Ablation-CAM re-runs the whole model for some layer
            (empty when every layer uses a proven cut).
        compile_note: set when a compiled model is explained through its
            original module.

    Raises:
        UnknownNameError: a layer that is not a module of the model.
        InvalidRequestError: an empty layer list, a bad batch size, a model
            whose parameters are not on ``device`` or were created under
            ``torch.inference_mode``.
        UnsupportedMethodError: a model with submodules compiled by
            ``torch.compile`` or compiled in place.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerArg,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        trace: bool = True,
        restrict_head: bool = True,
        layout: Layout | Mapping[str, Layout] = "auto",
        name: str | None = None,
    ) -> None:
        self.name = name if name is not None else type(model).__name__
        model, self.compile_note = _uncompiled(model)
        names = _layer_names(model, layer)
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
        inference = [
            n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_inference()
        ]
        if inference:
            raise InvalidRequestError(
                f"the model's tensors {inference[:5]} were created under torch.inference_mode, "
                "which forbids gradients through them; create or load the model outside it"
            )
        self.model = model
        self.layers: tuple[str, ...] = tuple(names)
        self.batch_size = batch_size
        self.restrict_head = restrict_head
        self._layouts = self._check_layouts(layout)
        self._views: dict[tuple[object, ...], LayerView] = {}
        self._dtype = params[0].dtype if params else None
        self._mode_dependent = [
            (name or "(the model)", m) for name, m in model.named_modules() if _mode_dependent(m)
        ]
        self._split: SplitModel | None = None
        self._proofs: dict[tuple[object, ...], str] = {}
        self._lock = threading.Lock()
        self.trace_note = "tracing disabled"
        if trace:
            self._split, self.trace_note = trace_split(model, names)

    def _check_layouts(self, layout: Layout | Mapping[str, Layout]) -> dict[str, Layout]:
        if isinstance(layout, Mapping):
            unknown = [k for k in layout if k not in self.layers]
            if unknown:
                raise UnknownNameError("layer", unknown[0], self.layers)
            return {name: layout.get(name, "auto") for name in self.layers}
        if isinstance(layout, str) and layout not in ("auto", "channels_first", "channels_last"):
            raise UnknownNameError("layout", layout, ("auto", "channels_first", "channels_last"))
        return dict.fromkeys(self.layers, layout)

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
        # Tensors made under torch.inference_mode cannot enter autograd: copy those.
        return tuple((t.clone() if t.is_inference() else t).detach().to(self.device) for t in xs)

    @staticmethod
    def _methods(methods: str | Sequence[str]) -> list[MethodSpec]:
        ids = [methods] if isinstance(methods, str) else list(methods)
        if not ids:
            raise InvalidRequestError(
                f"at least one method is needed; valid methods: {', '.join(list_methods())}"
            )
        return [method_spec(m) for m in dict.fromkeys(ids)]

    def _check_eval(self) -> None:
        training = [name for name, m in self._mode_dependent if m.training]
        if training:
            shown = ", ".join(repr(n) for n in training[:8])
            more = "" if len(training) <= 8 else f", ... ({len(training)} in all)"
            raise InvalidRequestError(
                f"model {self.name!r} has modules in training mode ({shown}{more}) whose output "
                "depends on the mode (BatchNorm would update its running statistics, dropout "
                "would make maps random); explanations never change the model: call "
                "model.eval() first"
            )

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

        Whatever the caller's grad mode (``torch.no_grad``,
        ``torch.inference_mode``), the engine switches on what it needs
        inside the call and restores the mode after it.

        Args:
            inputs: images ``(N, C, H, W)``, or a tuple whose first tensor is the
                images and the rest extra model inputs sharing dim 0;
                ``model(*inputs)`` is called.
            methods: method ids (see :func:`~camserve.engine.list_methods`).
            targets: ``k`` (top-k classes; an int or numpy integer), per-image
                class ids (``list[list[int]]``, an integer tensor or numpy array
                ``(N, K)``; a flat list is the ids of the only image when N is
                1, else one id per image), or a
                :data:`~camserve.engine.targets.ScoreFn`. Class targets need
                the output's class scores: the output itself, its ``logits``
                field, or its only ``(N, C)`` float tensor.
            score: ``"logit"`` (pre-softmax, default) or ``"probability"``
                (post-softmax, 002 footnote 1); ignored for a score function.
                Grad-CAM++'s alphas always use the pre-softmax score's gradient
                (002 eq. 9); with probabilities its weights use ReLU of the
                probability's gradient (002 eq. 4).
            options: method id -> keyword options (``{"gradcampp":
                {"normalize_alpha": True}}``, ``{"occlusion": {"mask": 35}}``),
                checked against the method's :class:`~camserve.engine.methods.MethodSpec`.
                ``{"gradcampp": {"stats": True}}`` fills ``stats["gradcampp"]``
                (and ``stats["gradcampp@<layer>"]``) with the alpha statistics
                of 002 Fig. 3-4; they are not computed otherwise.

        Raises:
            UnknownNameError: unknown method, option, score kind or class id.
            InvalidRequestError: bad shapes, dtypes, k, targets or option
                values; a model in training mode; a layer output that is not a
                supported layout.
            UnsupportedMethodError: ``cam`` without a GAP + linear head; a
                gradient method on a model whose scores do not depend on the
                layer through autograd; a guided method on a model with a
                smooth activation (GELU, SiLU, ...) or no ReLU-family one.
            NonFiniteOutputError: (a :class:`~camserve.errors.ModelFailureError`)
                the model's output or the target scores are NaN or infinite
                for some images (:attr:`~camserve.engine.outputs.NonFiniteOutputError.images`).
        """
        watch = Stopwatch(self.device)
        with watch.stage("total"), torch.inference_mode(False):
            xs = self._inputs(inputs)
            requested = self._methods(methods)
            opts = check_options(options)
            self._check_eval()
            result = self._explain(xs, requested, targets, score, opts, watch)
        result.timings.update(watch.result())
        return result

    def _explain(
        self,
        xs: tuple[Tensor, ...],
        requested: list[MethodSpec],
        targets: Targets,
        score: str,
        opts: dict[str, dict[str, Any]],
        watch: Stopwatch,
    ) -> Explanation:
        layer_specs = list(
            {
                s.id: s
                for s in (
                    method_spec(r.base) if r.base is not None else r
                    for r in requested
                    if r.resolution == "layer" or r.base is not None
                )
            }.values()
        )
        kinds: set[GradKind] = set().union(*(s.gradients for s in layer_specs))
        input_guided = any(s.input_gradient for s in requested)
        relu = input_guided or bool(kinds & {"guided", "deconv"})
        use_fx = (
            any(s.call == "tail" for s in layer_specs)
            and self._split is not None
            and bool(self._split.cuts)
        )
        if use_fx and self._prove_recorder(xs):
            use_fx = False
        want_logit_grads = score == "probability" and any(s.logit_gradient for s in layer_specs)
        n = int(xs[0].shape[0])
        size = (int(xs[0].shape[2]), int(xs[0].shape[3]))

        # ---- one forward
        state = ReluState()
        images = xs[0].detach().requires_grad_() if input_guided else xs[0]
        capture = LayerCapture(self.model, self.layers, grad=bool(kinds) or input_guided)
        frontier: tuple[Any, ...] | None = None
        with watch.stage("forward"), ExitStack() as stack:
            stack.enter_context(capture)
            stack.enter_context(torch.enable_grad() if input_guided else torch.no_grad())
            # the rectifier rules apply to the model only, never to a score function
            with ReluRouting(state) if relu else nullcontext():
                if use_fx and self._split is not None:
                    output, frontier = self._split.recorder(images, *xs[1:])
                    frontier = tuple(v.detach() if isinstance(v, Tensor) else v for v in frontier)
                else:
                    output = self.model(images, *xs[1:])
            capture.active = False
            missing = capture.missing()
            if missing:
                raise InvalidRequestError(f"layers {missing} did not run in the model's forward")
            check_finite(output, self.name, n)
            if relu and not state.routed:
                where = "the model" if input_guided else f"the model after layer {self.layers[0]!r}"
                raise UnsupportedMethodError(
                    f"{where} has no ReLU-family activation on the differentiated path, so the "
                    "guided and deconv rules would give the plain gradient; use the methods "
                    "without the guided rule (gradcam, ...)"
                )
            with torch.enable_grad():
                target, fn_scores = resolve_targets(targets, output, n, score, self.device)
                rows = torch.arange(n, device=self.device)
                scores = fn_scores if fn_scores is not None else target.scores(output, rows)
                check_finite(scores, self.name, n)
                logit_scores = None
                if want_logit_grads and target.fn is None:
                    logit_scores = target.scores(output, rows, kind="logit")
        raw = {name: capture.acts[name] for name in self.layers}
        views = {
            name: resolve_view(name, raw[name], self._layouts[name], size, self._views)
            for name in self.layers
        }

        # ---- one batched backward per gradient kind (normal; guided/deconv only when asked)
        grads: dict[str, dict[str, Tensor]] = {}
        logit_grads: dict[str, Tensor] = {}
        guided_input: Tensor | None = None
        k = target.k
        with watch.stage("backward"):
            grad_layers = [raw[name] for name in self.layers]
            for kind in _GRAD_KINDS:
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
                what = [f"layer {name!r}" for name in self.layers] if kind in kinds else []
                res = batched_vjp(ys, [*wrt, images] if want_input else wrt, [*what, "the input"])
                if want_input:
                    guided_input = res.pop()
                grads[kind] = {
                    name: views[name].maps(g[:, :k])
                    for name, g in zip(self.layers, res, strict=False)
                }
                if kind == "normal" and logit_scores is not None:
                    logit_grads = {
                        name: views[name].maps(g[:, k:])
                        for name, g in zip(self.layers, res, strict=False)
                    }
        # Drop the graph now: the re-running methods below must not keep it alive.
        output = tree_map(Tensor.detach, output)
        target_scores = scores.detach().float()
        del scores, logit_scores, fn_scores, grad_layers
        raw = {name: a.detach() for name, a in raw.items()}
        acts = {name: views[name].maps(raw[name]) for name in self.layers}

        runner = Runner(
            self.model,
            xs,
            target,
            self._split if use_fx else None,
            frontier,
            restrict_head=self.restrict_head,
            name=self.name,
        )
        if use_fx:
            runner.fallback = self._prove_cuts(runner, raw)
        maps: dict[str, dict[str, Tensor]] = {name: {} for name in self.layers}
        stats: dict[str, dict[str, float]] = {}
        for li, name in enumerate(self.layers):
            for spec in layer_specs:
                with watch.stage(f"method.{spec.id}"):
                    maps[name][spec.id] = self._layer_map(
                        spec,
                        name,
                        acts[name],
                        raw[name],
                        views[name],
                        grads,
                        logit_grads,
                        target,
                        output,
                        target_scores,
                        runner,
                        self._method_options(spec.id, opts),
                        stats,
                        li == 0,
                    )

        if any(s.resolution == "input" for s in requested):
            maps[INPUT_LAYER] = self._input_maps(
                requested, maps, guided_input, target_scores, runner, opts, watch
            )
        logits = find_logits(output, n)
        return Explanation(
            output=output,
            logits=logits.float() if logits is not None else None,
            probabilities=torch.softmax(logits.float(), dim=1) if logits is not None else None,
            target_ids=target.ids.to(self.device),
            target_scores=target_scores,
            maps=maps,
            stats=stats,
            timings={"upsample": 0.0},
            layers=self.layers,
            methods=tuple(s.id for s in requested),
            input_size=size,
        )

    @staticmethod
    def _method_options(method: str, opts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Options of a layer method; those given to ``guided_<m>`` apply to ``m``'s map too."""
        out = {k: v for k, v in opts.get(f"guided_{method}", {}).items() if k != "reduce"}
        return out | opts.get(method, {})

    # ------------------------------------------------------ proving fx cuts
    def _prove_recorder(self, xs: tuple[Tensor, ...]) -> str:
        """Why the traced model must not replace the model's forward (``""`` when it may).

        Once per input shape, the traced recorder and the model run on the
        first image; their outputs must have the same structure (types) and
        values. ``torch.fx`` rebuilds some outputs differently (a dict for a
        dict-like output object), which a score function would notice.
        """
        split = self._split
        if split is None:  # pragma: no cover - only called with a split
            return "no fx cut"
        key = ("recorder", tuple((tuple(x.shape[1:]), x.dtype) for x in xs))
        with self._lock:
            verdict = self._proofs.get(key)
        if verdict is not None:
            return verdict
        one = tuple(x[:1] for x in xs)
        try:
            with torch.no_grad():
                traced, _ = split.recorder(*one)
                real = self.model(*one)
            verdict = compare_outputs(traced, real, "the traced model")
        except Exception as exc:  # a traced model that cannot run is not used
            verdict = f"the traced model fails ({type(exc).__name__}: {exc})"
        with self._lock:
            self._proofs[key] = verdict
            if verdict:
                note = f"Ablation-CAM re-runs the whole model: {verdict}"
                if note not in self.trace_note:
                    self.trace_note = "; ".join(filter(None, [self.trace_note, note]))
        return verdict

    def _prove_cuts(self, runner: Runner, raw: dict[str, Tensor]) -> frozenset[str]:
        """Layers whose fx cut is not proven to reproduce the model (they re-run it whole)."""
        split = self._split
        if split is None:  # pragma: no cover - only called with a split
            return frozenset(self.layers)
        shapes = tuple((tuple(x.shape[1:]), x.dtype) for x in runner.inputs)
        failed: set[str] = set()
        for name in self.layers:
            if name not in split.cuts:
                continue
            key = (name, shapes)
            with self._lock:
                verdict = self._proofs.get(key)
            if verdict is None:
                verdict = runner.check_cut(name, raw[name][:1])
                with self._lock:
                    self._proofs[key] = verdict
                    if verdict:
                        note = f"Ablation-CAM re-runs the whole model for layer {name!r}: {verdict}"
                        if note not in self.trace_note:
                            self.trace_note = "; ".join(filter(None, [self.trace_note, note]))
            if verdict:
                failed.add(name)
        return frozenset(failed)

    # ------------------------------------------------------------ per method
    def _layer_map(
        self,
        spec: MethodSpec,
        layer: str,
        acts: Tensor,
        raw: Tensor,
        view: LayerView,
        grads: dict[str, dict[str, Tensor]],
        logit_grads: dict[str, Tensor],
        target: Target,
        output: Any,
        target_scores: Tensor,
        runner: Runner,
        options: dict[str, Any],
        stats: dict[str, dict[str, float]],
        first: bool,
    ) -> Tensor:
        fn = spec.function
        if spec.call == "gradient":
            kw = dict(options)
            if spec.logit_gradient:
                kw["logit_grads"] = logit_grads.get(layer)
            out = fn(acts, grads[spec.gradient_kind][layer], **kw)
            if spec.returns_stats:
                out, st = out
                if st:  # only when the method's options ask for statistics
                    stats[f"{spec.id}@{layer}"] = st
                    if first:
                        stats[spec.id] = st
            return finite(out)
        if spec.call == "head":
            return finite(fn(acts, self._cam_weights(layer, acts, target, output)))
        kw = {"batch_size": self.batch_size} | options
        if spec.call == "tail":
            tail = runner.tail(layer)
            if view.index is not None:
                base_tail = tail

                def tail(i: int, a: Tensor) -> Tensor:
                    return base_tail(i, view.restore(a, raw[i : i + 1]))

            return finite(fn(acts, target_scores, tail, **kw).float())
        if spec.call == "masked_input":
            return finite(fn(runner.inputs[0], acts, runner.score, **kw).float())
        raise AssertionError(f"unhandled layer method call {spec.call}")  # pragma: no cover

    def _cam_weights(self, layer: str, acts: Tensor, target: Target, output: Any) -> Tensor:
        if target.fn is not None:
            raise UnsupportedMethodError(
                "cam explains class scores of a GAP + linear head, not a score function; "
                "use gradcam (equal to cam on such a head) for custom scores"
            )
        logits = find_logits(output, int(acts.shape[0]))
        weight = find_cam_head(self.model, acts, logits) if logits is not None else None
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
        requested: list[MethodSpec],
        maps: dict[str, dict[str, Tensor]],
        guided_input: Tensor | None,
        target_scores: Tensor,
        runner: Runner,
        opts: dict[str, dict[str, Any]],
        watch: Stopwatch,
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        guided: dict[str, Tensor] = {}
        default_reduce = opts.get("guided_backprop", {}).get("reduce", "absmax")
        images = runner.inputs[0]
        for spec in requested:
            if spec.resolution != "input":
                continue
            m = spec.id
            with watch.stage(f"method.{m}"):
                if spec.call in ("guided_backprop", "guided_product"):
                    if guided_input is None:  # pragma: no cover - requested => computed
                        raise AssertionError("guided input gradient missing")
                    reduce = opts.get(m, {}).get("reduce", default_reduce)
                    if reduce not in guided:
                        bp = method_spec("guided_backprop").function
                        guided[reduce] = bp(guided_input, reduce=reduce)
                    if spec.call == "guided_backprop":
                        out[m] = guided[reduce]
                    else:
                        assert spec.base is not None
                        out[m] = spec.function(guided[reduce], maps[self.layers[0]][spec.base])
                    continue
                kw = {"batch_size": self.batch_size} | opts.get(m, {})
                if spec.call == "input_score":
                    out[m] = finite(
                        spec.function(images, target_scores, runner.score, **kw).float()
                    )
                elif spec.call == "input_gradient":
                    out[m] = finite(spec.function(images, runner.input_grad, **kw).float())
                else:  # pragma: no cover - the registry's calls are all handled
                    raise AssertionError(f"unhandled input method call {spec.call}")
        return out

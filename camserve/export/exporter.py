"""ONNX export of a model together with the gradients its Grad-CAM-family maps need.

The exported graph computes, in one onnxruntime call, the model output, the
chosen layer's activations and the gradients of the K target scores with
respect to that layer. Hooks and ``torch.autograd.grad`` do not export
(ONNX has no autograd), so the forward and the vector-Jacobian product are
first traced together into plain ATen operators with
``torch.fx.experimental.proxy_tensor.make_fx`` (symbolic shapes, so the batch
size and the number of targets stay dynamic), then handed to the dynamo-based
``torch.onnx.export``:

- a forward hook adds a zero tensor ``delta`` to the layer's output, so
  ``d output / d delta`` is the gradient with respect to the layer, and only
  the part of the network after the layer is differentiated;
- ``torch.func.vjp`` with respect to ``delta`` and ``torch.func.vmap`` over the
  K one-hot cotangents give every target's gradient in one batched backward.

Graph interface (names are fixed; the metadata key ``camserve.interface``
lists them):

- inputs: ``images`` float32 ``(N, 3, H, W)``; the model's further inputs (a
  question's token ids...) as ``input_1``, ``input_2``, ... sharing dim 0; for
  class targets ``class_ids`` int64 ``(N, K)``: the classes to explain, where a
  negative entry in column j means the j-th most probable class (top-k).
- outputs: ``logits`` ``(N, C)`` (the model output), ``activations``
  ``(N, C_l, h, w)``, ``gradients`` ``(N, K, C_l, h, w)`` of the K target
  logits, ``target_ids`` int64 ``(N, K)``, and for class targets
  ``expected_gradients`` ``(N, C_l, h, w)``: the gradient of
  ``sum_j softmax(logits)_j * logits_j`` (the runtime turns it into the
  gradient of a class probability, ``p_c (g_c - g_expected)``, 002 footnote 1);
  for a global-average-pooling + linear head also ``cam`` ``(N, K, h, w)``, the
  CAM maps computed in the graph from the head's weights (000 sec. 3).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine.graph import find_cam_head
from camserve.engine.methods import METHOD_SPECS, method_spec
from camserve.engine.methods.activation import cam
from camserve.engine.methods.gradient import gradcampp
from camserve.errors import ExportError, InvalidRequestError, UnknownNameError
from camserve.export.passes import TRACE_DECOMPOSITIONS, optimize

__all__ = [
    "DEFAULT_TOLERANCE",
    "INTERFACE_VERSION",
    "MAP_METHODS",
    "ExportReport",
    "export_onnx",
]

INTERFACE_VERSION = 1
"""Version of the graph interface described in the module docstring."""

DEFAULT_TOLERANCE = 1e-4
"""Largest accepted difference between onnxruntime and torch, relative to max(1, max |torch|)."""

ScoreFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how closely onnxruntime matched torch.

    Attributes:
        path: the ONNX file.
        layer: the explained layer (module path).
        inputs, outputs: the graph's input and output names.
        cam: whether the graph computes CAM maps (GAP + linear head).
        targets: ``"classes"`` (a ``class_ids`` input, any K) or ``"function"``
            (a score function traced into the graph, fixed K).
        opset: the ONNX opset.
        max_abs_diff: output name -> max absolute difference onnxruntime vs torch
            on the check inputs (the example, and a batch of another size).
        tolerance: the accepted difference, relative to ``max(1, max |torch|)``.
        seconds: wall time of the export and the check.
    """

    path: Path
    layer: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cam: bool
    targets: str
    opset: int
    max_abs_diff: dict[str, float]
    tolerance: float
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per fact, for the command line."""
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        return (
            f"wrote {self.path} (opset {self.opset}, layer {self.layer!r}, "
            f"outputs {', '.join(self.outputs)})\n"
            f"onnxruntime vs torch, max abs diff: {diffs} "
            f"(tolerance {self.tolerance:g} x max(1, max |torch|))"
        )


MAP_METHODS: tuple[str, ...] = (
    "gradcam",
    "gradcam_pos",
    "gradcampp",
    "xgradcam",
    "layercam",
    "hirescam",
    "counterfactual",
)
"""Methods whose maps of the target scores the graph computes by default (``map.<id>``
outputs), traced from the engine's own method functions; the runtime computes the
others from ``gradients`` (and every map for ``score="probability"``)."""


PLAIN_GRADIENT_METHODS: tuple[str, ...] = tuple(
    s.id
    for s in METHOD_SPECS.values()
    if s.call == "gradient"
    and s.gradients == frozenset({"normal"})
    and not (s.returns_stats or s.logit_gradient)
)
"""Gradient methods that are a pure function ``f(activations, gradients)`` of the plain
gradients (Grad-CAM, Grad-CAM+, XGrad-CAM, LayerCAM, HiResCAM, counterfactual, ...)."""


def _map_methods(methods: Sequence[str]) -> tuple[str, ...]:
    allowed = list(PLAIN_GRADIENT_METHODS)
    allowed.append("gradcampp")
    for m in methods:
        if m not in allowed:
            raise UnknownNameError("graph map method", m, allowed)
    return tuple(dict.fromkeys(methods))


# ---------------------------------------------------------------- the traced function
class _Joint:
    """forward + VJP at ``layer`` as a function of (parameters, inputs, class ids).

    The K target gradients come from one ``vmap``-ed VJP (dynamic K), or with
    ``loop`` from K VJPs one after the other (K fixed in the graph), for models
    where a batching rule fixes the batch size in the traced shapes.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        act_shape: tuple[int, int, int],
        score_fn: ScoreFn | None,
        cam_weight: Tensor | None,
        *,
        loop: bool = False,
        map_methods: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.loop = loop
        self.map_methods = tuple(map_methods)
        self.layer = layer
        self.module = model.get_submodule(layer)
        self.act_shape = act_shape
        self.score_fn = score_fn
        self.cam_weight = cam_weight
        self.names = [n for n, _ in model.named_parameters()] + [
            n for n, _ in model.named_buffers()
        ]

    def state(self) -> list[Tensor]:
        """The parameters and buffers (then the CAM weight, if any) the traced graph takes."""
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        out = [tensors[n].detach() for n in self.names]
        return out if self.cam_weight is None else [*out, self.cam_weight]

    def _run(self, params: dict[str, Tensor], xs: Sequence[Tensor], delta: Tensor) -> Any:
        box: dict[str, Tensor] = {}

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if "act" in box:
                raise InvalidRequestError(
                    f"layer {self.layer!r} runs more than once per forward; "
                    "pick a module that runs once"
                )
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise InvalidRequestError(
                    f"layer {self.layer!r} must output a float tensor (N, C, h, w)"
                )
            box["act"] = output
            return output + delta

        handle = self.module.register_forward_hook(hook)
        try:
            out = torch.func.functional_call(self.model, params, tuple(xs))
        finally:
            handle.remove()
        return out, box["act"]

    def __call__(
        self, state: list[Tensor], xs: list[Tensor], class_ids: Tensor | None
    ) -> tuple[Tensor, ...]:
        params = dict(zip(self.names, state[: len(self.names)], strict=True))
        n = xs[0].shape[0]
        delta = xs[0].new_zeros((n, *self.act_shape))

        def fn(d: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            out, act = self._run(params, xs, d)
            score = out if self.score_fn is None else self.score_fn(out)
            return score, (out.detach(), act.detach())

        # with has_aux, vjp returns three values (its annotation says two)
        result: tuple[Any, ...] = tuple(torch.func.vjp(fn, delta, has_aux=True))
        scores, vjp_fn, aux = result
        out, act = aux
        if self.score_fn is not None:
            k = scores.shape[1]
            eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
            cot = eye[None].expand(n, k, k)
            if self.loop:
                grads = torch.stack([vjp_fn(cot[:, j])[0] for j in range(k)], dim=1)
            else:
                (grads,) = torch.func.vmap(vjp_fn, in_dims=1, out_dims=1)(cot)
            ids = torch.arange(k, device=scores.device)[None].expand(n, k)
            return (out, act, grads, ids, scores.detach(), *self.maps(act, grads))
        logits = scores.detach()
        if class_ids is None:
            raise InvalidRequestError("class targets need class ids")
        k = class_ids.shape[1]
        top = logits.topk(k, dim=1).indices
        ids = torch.where(class_ids >= 0, class_ids, top)
        onehot = F.one_hot(ids, logits.shape[1]).to(logits.dtype)  # (N, K, C)
        probs = torch.softmax(logits, dim=1)
        cot = torch.cat([onehot, probs[:, None]], dim=1)  # (N, K + 1, C)
        if self.loop:
            both = torch.stack([vjp_fn(cot[:, j])[0] for j in range(k + 1)], dim=1)
        else:
            (both,) = torch.func.vmap(vjp_fn, in_dims=1, out_dims=1)(cot)
        grads, expected = both[:, :-1], both[:, -1]
        outs: list[Tensor] = [logits, act, grads, ids, expected]
        if self.cam_weight is not None:
            outs.append(cam(act, state[-1][ids]))
        outs += self.maps(act, grads)
        return tuple(outs)

    def maps(self, act: Tensor, grads: Tensor) -> list[Tensor]:
        """The gradient family's maps of the logits, by the engine's own method functions."""
        out = []
        for m in self.map_methods:
            if m == "gradcampp":
                out.append(gradcampp(act, grads)[0])
            else:
                out.append(method_spec(m).function(act, grads))
        return out


class _Graph(nn.Module):
    """The traced joint function as a module (its parameters as buffers) for the exporter."""

    def __init__(self, traced: nn.Module, state: list[Tensor], n_inputs: int, classes: bool):
        super().__init__()
        self.traced = traced
        self.n_state = len(state)
        self.n_inputs = n_inputs
        self.classes = classes
        for i, t in enumerate(state):
            self.register_buffer(f"state_{i}", t.clone())

    def forward(self, *args: Tensor) -> Any:
        state = [getattr(self, f"state_{i}") for i in range(self.n_state)]
        xs = list(args[: self.n_inputs])
        class_ids = args[self.n_inputs] if self.classes else None
        return self.traced(state, xs, class_ids)


def _trace(
    joint: _Joint, state: list[Tensor], xs: list[Tensor], class_ids: Tensor | None
) -> nn.Module:
    """``joint`` traced to ATen operators with symbolic shapes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with _quiet():
            traced: nn.Module = make_fx(
                joint, tracing_mode="symbolic", decomposition_table=TRACE_DECOMPOSITIONS
            )(state, xs, class_ids)
    except (InvalidRequestError, ExportError):
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [""]
        raise ExportError(
            "the forward and its vector-Jacobian product could not be traced "
            f"({type(exc).__name__}: {lines[0][:300]})"
        ) from exc
    assert isinstance(traced, torch.fx.GraphModule)  # make_fx's result
    return optimize(traced)


def _specialized(traced: nn.Module, n_inputs: int, classes: bool) -> list[str]:
    """Input dims that should be dynamic but that tracing fixed to the example's size."""
    graph = traced.graph
    assert isinstance(graph, torch.fx.Graph)
    tensors = [
        n.meta["val"]
        for n in graph.nodes
        if n.op == "placeholder" and isinstance(n.meta.get("val"), Tensor)
    ]
    # placeholders: the state tensors, then the inputs, then the class ids
    tail = tensors[-(n_inputs + (1 if classes else 0)) :]
    names = ["images", *(f"input_{j}" for j in range(1, n_inputs))]
    checks = [(f"{name} dim 0", t.shape[0]) for name, t in zip(names, tail, strict=False)]
    if classes:
        checks += [("class_ids dim 0", tail[-1].shape[0]), ("class_ids dim 1", tail[-1].shape[1])]
    fixed = []
    for label, size in checks:
        if not isinstance(size, torch.SymInt):
            fixed.append(label)
            continue
        expr = size.node.shape_env.replace(size.node.expr)
        if expr.is_number:
            fixed.append(label)
    return fixed


# ---------------------------------------------------------------- errors
_TARGET = re.compile(r"target=(?:torch\.ops\.)?([\w.]+)")
_OVERLOAD = re.compile(r"op='([\w.]+)', overload='(\w+)'")


def _explain_failure(exc: BaseException) -> ExportError:
    """An :class:`ExportError` naming the operator the exporter could not translate."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 20:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    operator = None
    for e in chain:
        m = _OVERLOAD.search(str(e))
        if m:
            operator = f"{m.group(1)}.{m.group(2)}"
            break
    if operator is None:
        for e in chain:
            m = _TARGET.search(str(e))
            if m and "translating node" in str(e):
                operator = m.group(1)
                break
    innermost = chain[-1]
    lines = str(innermost).strip().splitlines() or [""]
    reason = f"{type(innermost).__name__}: {lines[0][:300]}"
    return ExportError(reason, operator=operator)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's own deprecation and progress warnings during one export."""
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------- export
def _as_inputs(example_input: Tensor | Sequence[Tensor]) -> list[Tensor]:
    xs = [example_input] if isinstance(example_input, Tensor) else list(example_input)
    if not xs or not all(isinstance(x, Tensor) for x in xs):
        raise InvalidRequestError(
            "example_input must be a Tensor (N, C, H, W) or a tuple of tensors, "
            f"got {type(example_input).__name__}"
        )
    x = xs[0]
    if x.dim() != 4 or x.dtype != torch.float32 or x.shape[0] < 1:
        raise InvalidRequestError(
            f"the example images must be float32 (N, C, H, W) with N >= 1, got "
            f"{tuple(x.shape)} {x.dtype}"
        )
    for j, e in enumerate(xs[1:], start=1):
        if e.dim() == 0 or e.shape[0] != x.shape[0]:
            raise InvalidRequestError(
                f"example input {j} must share the batch size {x.shape[0]} in dim 0, "
                f"got shape {tuple(e.shape)}"
            )
    return [t.detach().cpu() for t in xs]


def _resized_batch(xs: list[Tensor]) -> list[Tensor]:
    """A batch of another size from the example: the first rows, or the rows twice."""
    n = xs[0].shape[0]
    if n > 1:
        return [t[: n - 1] for t in xs]
    return [torch.cat([t, t.flip(-1) if t.is_floating_point() else t]) for t in xs]


def _max_diff(a: np.ndarray[Any, Any], b: Tensor) -> tuple[float, float]:
    ref = b.detach().double().numpy()
    if a.shape != ref.shape:
        return float("inf"), 1.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    return float(np.abs(a.astype(np.float64) - ref).max()) if ref.size else 0.0, scale


def export_onnx(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    layer: str,
    out: str | Path,
    *,
    targets: int | ScoreFn = 5,
    cam_maps: bool = True,
    map_methods: Sequence[str] = MAP_METHODS,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
) -> ExportReport:
    """Export ``model`` with its activations and target gradients at ``layer`` to ONNX.

    The graph (interface in the module docstring) has a dynamic batch size
    (and, for class targets, a dynamic number of targets K). After writing,
    ``onnx.checker`` checks the file and onnxruntime runs it on the example
    and on a batch of another size; the logits, activations and gradients are
    compared with torch's. Example:

        >>> report = export_onnx(model.eval(), images, "layer4", "model.onnx")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP

    Args:
        model: a module in eval mode (``model.eval()``) on the CPU, float32.
        example_input: real images ``(N, 3, H, W)`` float32, or a tuple whose
            first tensor is the images and the rest the model's further inputs
            (sharing dim 0). ``H`` and ``W`` (and the further inputs' other
            dims) are fixed in the graph.
        layer: module path of the layer to explain (``model.named_modules()``);
            it must output ``(N, C, h, w)`` and run once per forward.
        out: the ONNX file to write (its folder is created).
        targets: for a model whose output is ``(N, C)`` class scores, the number
            of top classes the check explains (the graph takes any K through its
            ``class_ids`` input); for another output, a score function
            ``fn(output) -> (N, K)`` traced into the graph (fixed K).
        cam_maps: add the ``cam`` output when the layer feeds a global average
            pooling + linear head (found numerically, as the torch engine does).
        map_methods: methods whose maps the graph computes as ``map.<id>``
            outputs (default :data:`MAP_METHODS`; ``()`` for none), traced from
            the torch engine's method functions.
        tolerance: accepted max abs difference between onnxruntime and torch,
            relative to ``max(1, max |torch value|)`` per output.
        opset: ONNX opset (default: the exporter's).
        metadata: extra ``metadata_props`` of the file (labels, preprocessing...).

    Returns:
        An :class:`ExportReport` with the max abs differences.

    Raises:
        UnknownNameError: ``layer`` is not a module of the model.
        InvalidRequestError: a model in training mode, parameters not float32 on
            the CPU, a bad example input or layer output.
        ExportError: an operator the exporter cannot translate (named in
            ``operator``), a model the tracer cannot follow, a checker failure,
            or onnxruntime differing from torch beyond ``tolerance``.
    """
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer == "" or layer not in modules:
        raise UnknownNameError("layer", layer, [n for n in modules if n])
    if model.training:
        raise InvalidRequestError(
            "the model is in training mode (batch norm and dropout would depend on the "
            "batch); call model.eval() before exporting"
        )
    params = list(model.parameters()) + list(model.buffers())
    bad = {
        f"{p.dtype}/{p.device}"
        for p in params
        if p.is_floating_point() and (p.dtype != torch.float32 or p.device.type != "cpu")
    }
    if bad:
        raise InvalidRequestError(
            f"export needs float32 parameters on the CPU, got {sorted(bad)}; "
            "use model.float().cpu()"
        )
    if isinstance(targets, bool) or not (isinstance(targets, int) or callable(targets)):
        raise InvalidRequestError(f"targets must be an int k or a score function, got {targets!r}")
    xs = _as_inputs(example_input)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)

    # ---- one eager run: the layer's shape, the output's kind, the CAM head
    probe: dict[str, Tensor] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            probe.setdefault("act", output.detach())

    handle = modules[layer].register_forward_hook(record)
    try:
        with torch.no_grad():
            output = model(*xs)
    finally:
        handle.remove()
    act = probe.get("act")
    if act is None or act.dim() != 4 or not act.is_floating_point():
        shape = tuple(act.shape) if act is not None else None
        raise InvalidRequestError(
            f"layer {layer!r} must output a float tensor (N, C, h, w), got {shape}; "
            "pick a convolutional layer"
        )
    classes = not callable(targets)
    if classes:
        if not isinstance(output, Tensor) or output.dim() != 2:
            raise InvalidRequestError(
                "class targets need a model output of shape (N, C); pass a score function "
                "fn(output) -> (N, K) as targets for other outputs"
            )
        k = int(targets)  # type: ignore[arg-type]  # not callable: an int
        if not 1 <= k <= output.shape[1]:
            raise InvalidRequestError(f"targets (top-k) must be in 1..{output.shape[1]}, got {k}")
    cam_weight = None
    if classes and cam_maps:
        cam_weight = find_cam_head(model, act, output)
    score_fn = None if classes else targets
    joint = _Joint(
        model,
        layer,
        (int(act.shape[1]), int(act.shape[2]), int(act.shape[3])),
        score_fn,  # type: ignore[arg-type]  # callable when not classes
        None if cam_weight is None else cam_weight.detach().clone(),
        map_methods=_map_methods(map_methods),
    )
    # Symbolic tracing specialises a dimension of size 1 to the constant 1, so a single
    # example image is traced as a batch of two copies (the graph's batch stays dynamic).
    trace_xs = xs if xs[0].shape[0] > 1 else [torch.cat([x, x]) for x in xs]
    n = trace_xs[0].shape[0]
    class_ids = torch.full((n, k), -1, dtype=torch.long) if classes else None
    state = joint.state()

    # ---- trace forward + VJP to ATen ops, then export
    traced = _trace(joint, state, trace_xs, class_ids)
    fixed = _specialized(traced, len(xs), classes)
    if fixed:
        joint.loop = True
        traced = _trace(joint, state, trace_xs, class_ids)
        fixed = [f for f in _specialized(traced, len(xs), classes) if f != "class_ids dim 1"]
        if fixed:
            raise ExportError(
                f"the traced forward and backward fix {', '.join(fixed)} to the example's "
                "size (an operator's shape rule is not symbolic), so the graph could not "
                "have a dynamic batch size"
            )
    dynamic_k = classes and not joint.loop
    graph = _Graph(traced, state, len(xs), classes).eval()
    in_names = ["images", *(f"input_{j}" for j in range(1, len(xs)))]
    args: list[Tensor] = list(trace_xs)
    batch = torch.export.Dim("batch", min=1, max=65536)
    dyn: list[dict[int, Any]] = [{0: batch} for _ in xs]
    if classes and class_ids is not None:
        in_names.append("class_ids")
        args.append(class_ids)
        k_dim = torch.export.Dim("targets", min=1, max=65536)
        dyn.append({0: batch, 1: k_dim} if dynamic_k else {0: batch})
    out_names = ["logits", "activations", "gradients", "target_ids"]
    out_names += ["expected_gradients"] if classes else ["target_scores"]
    if cam_weight is not None:
        out_names.append("cam")
    out_names += [f"map.{m}" for m in joint.map_methods]
    try:
        with _quiet():
            program = torch.onnx.export(
                graph,
                tuple(args),
                dynamo=True,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes={"args": tuple(dyn)},
                opset_version=opset,
                verbose=False,
                optimize=True,
            )
    except Exception as exc:
        raise _explain_failure(exc) from exc
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise ExportError("the exporter returned no program")
    meta = {
        "camserve.interface": str(INTERFACE_VERSION),
        "camserve.layer": layer,
        "camserve.targets": "classes" if classes else "function",
        "camserve.cam": "1" if cam_weight is not None else "0",
        "camserve.max_targets": "0" if dynamic_k else str(k if classes else 0),
        "camserve.inputs": json.dumps(in_names),
        "camserve.outputs": json.dumps(out_names),
        **(metadata or {}),
    }
    proto = program.model_proto
    for key, value in meta.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save_model(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the graph: {exc}") from exc
    op_set = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    # ---- onnxruntime vs torch on the example and on a batch of another size
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the graph: {exc}") from exc
    diffs: dict[str, float] = {}
    worst: list[str] = []
    for batch_xs in (xs, _resized_batch(xs)):
        m = batch_xs[0].shape[0]
        ids = torch.full((m, k), -1, dtype=torch.long) if classes else None
        feed = {name: t.numpy() for name, t in zip(in_names, batch_xs, strict=False)}
        if ids is not None:
            feed["class_ids"] = ids.numpy()
        got = sess.run(out_names, feed)
        with torch.no_grad():
            plain = model(*batch_xs)
        ref = list(joint(state, batch_xs, ids))
        ref[0] = plain if isinstance(plain, Tensor) else ref[0]
        for name, value, expect in zip(out_names, got, ref, strict=True):
            if name == "target_ids":
                # ties between class scores may order differently; compare the scores
                continue
            d, scale = _max_diff(value, expect)
            diffs[name] = max(diffs.get(name, 0.0), d)
            if d > tolerance * scale:
                worst.append(f"{name} (batch {m}): {d:.3g} > {tolerance * scale:.3g}")
    report = ExportReport(
        path=path,
        layer=layer,
        inputs=tuple(in_names),
        outputs=tuple(out_names),
        cam=cam_weight is not None,
        targets="classes" if classes else "function",
        opset=op_set,
        max_abs_diff=diffs,
        tolerance=tolerance,
        seconds=time.perf_counter() - t0,
        metadata=meta,
    )
    if worst:
        raise ExportError(
            "onnxruntime differs from torch beyond the tolerance: " + "; ".join(worst)
        )
    return report

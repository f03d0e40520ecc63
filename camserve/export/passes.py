"""Exact rewrites of the traced forward + VJP graph before it goes to ONNX.

The traced graph repeats work that costs onnxruntime more than torch: the
engine's method functions each guard their inputs against NaN and inf
(``nan_to_num``), the backward of global average pooling writes its gradient
at full spatial size before it is divided, and ``vmap`` copies a linear head's
weight once per target. onnxruntime's ``Where`` is neither vectorised nor
parallel on the CPU (onnxruntime issue #5896: about 6 ms for a guard of a
``8 x 5 x 2048 x 7 x 7`` tensor, 34 ms for a ``copysign`` written with it,
against 0.5 ms for a ``Mul``), so where a guard sits and how a sign is copied
decide much of the maps' price. Every rewrite here leaves each output value
of the exported graph unchanged, bit for bit (``tests/export/test_graph_passes.py``;
ONNX's ``Expand`` writes its output out, whereas torch, running the rewritten
graph itself, may sum a reduction over an expanded view in another order).

Measured on a ResNet-50-shaped network at batch 8 with the top 5 classes
(``benchmarks/onnx_profile.py``): onnxruntime's kernel time outside the
convolutions fell from 93 to 34 ms per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

__all__ = [
    "TRACE_DECOMPOSITIONS",
    "copysign",
    "decompose_nan_guards",
    "drop_redundant_guards",
    "expand_last",
    "nan_to_num",
    "optimize",
    "sink_nan_guards",
    "unbatched_matmuls",
]

aten = torch.ops.aten


def copysign(a: Tensor, b: Tensor) -> Tensor:
    """``copysign(a, b)`` as ``|a| * (1 - 2 [b < 0])``: elementwise passes, no ``Where``.

    Equal to ``torch.copysign`` except for ``b = -0.0`` and a NaN ``b`` with its
    sign bit set (both give ``+|a|``; ONNX has no ``signbit``). Grad-CAM++'s safe
    denominator ``sum A g + 2`` is never either.
    """
    sign = 1.0 - 2.0 * (b < 0).to(a.dtype)  # exactly +1 or -1
    out: Tensor = a.abs() * sign
    return out


def nan_to_num(
    a: Tensor, nan: float | None = 0.0, posinf: float | None = None, neginf: float | None = None
) -> Tensor:
    """``nan_to_num`` in three passes (IsNaN, Clip, Where) instead of the default six.

    With ``posinf`` / ``neginf`` left at the dtype's extremes, clamping to them maps
    +-inf there and leaves every finite value alone, so this equals ``nan_to_num``.
    """
    if not a.is_floating_point() or posinf is not None or neginf is not None:
        kept: Tensor = torch.ops.aten.nan_to_num.default(a, nan, posinf, neginf)
        return kept
    info = torch.finfo(a.dtype)
    out: Tensor = torch.where(torch.isnan(a), nan or 0.0, a.clamp(info.min, info.max))
    return out


TRACE_DECOMPOSITIONS: dict[Any, Callable[..., Tensor]] = {aten.copysign.Tensor: copysign}
"""Operators rewritten while tracing. ``nan_to_num`` is kept whole until
:func:`optimize` has moved and merged the guards, then decomposed by
:func:`decompose_nan_guards`."""

# Operators whose output is a view of their first argument: an elementwise function
# of the view equals the view of the function's result, and a later in-place write
# to the base shows through both.
_VIEWS = {
    aten.expand.default,
    aten.view.default,
    aten.permute.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.transpose.int,
    aten.t.default,
    aten.alias.default,
    aten.detach.default,
}
# Views that commute with expand (along a dim it does not repeat), and elementwise
# operators: f(expand(x)) == expand(f(x)), computed on x's elements.
_MOVES_PAST_EXPAND = {aten.permute.default, aten.slice.Tensor, aten.select.int}
_IN_PLACE_BINARY = {aten.mul_.Tensor, aten.add_.Tensor, aten.sub_.Tensor, aten.div_.Tensor}
_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, *_IN_PLACE_BINARY}
_ELEMENTWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.mul.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.rsub.Scalar,
    aten.abs.default,
    aten.neg.default,
    aten.relu.default,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.nan_to_num.default,
    aten.lt.Scalar,
    aten.gt.Scalar,
    aten._to_copy.default,
}


def _val(node: Any) -> Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, Tensor) else None


def _is_guard(node: fx.Node) -> bool:
    """``nan_to_num(x)`` with NaN -> 0 and +-inf -> the dtype's extremes (the engine's guard)."""
    if node.op != "call_function" or node.target != aten.nan_to_num.default:
        return False
    args = list(node.args) + [None] * (4 - len(node.args))
    nan = node.kwargs.get("nan", args[1])
    posinf = node.kwargs.get("posinf", args[2])
    neginf = node.kwargs.get("neginf", args[3])
    return nan in (None, 0, 0.0) and posinf is None and neginf is None


def _is_relu(node: fx.Node) -> bool:
    """``relu(x)`` or ``clamp(x, min=0)``: commutes with the guard (NaN -> 0 either way)."""
    if node.op != "call_function":
        return False
    if node.target == aten.relu.default:
        return True
    if node.target == aten.clamp_min.default:
        return _is_zero(node.args[1])
    if node.target == aten.clamp.default:
        lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        hi = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
        return _is_zero(lo) and hi is None
    return False


def _is_zero(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == 0


def _mutable(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _written_after(node: fx.Node) -> bool:
    """Whether an in-place operator writes ``node``'s storage after ``node`` is computed.

    The storage is shared by ``node``'s base (up through views and in-place
    operators, which return their first argument) and every view of it. A write
    before ``node`` (the in-place ReLU that made an activation) is harmless: every
    rewrite here reads ``node`` later than that.
    """
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    base = node
    while base.op == "call_function" and (base.target in _VIEWS or _mutable(base)):
        first = base.args[0]
        if not isinstance(first, fx.Node):
            break
        base = first
    todo, seen = [base], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op != "call_function" or not user.args or user.args[0] is not n:
                continue
            if _mutable(user) and order[user] > order[node]:
                return True
            if user.target in _VIEWS or _mutable(user):
                todo.append(user)
    return False


def _same_dtype(a: fx.Node, b: Any) -> bool:
    va, vb = _val(a), _val(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and va.is_floating_point()


def _infer(node: fx.Node) -> None:
    """Sets ``node.meta["val"]`` by running its operator on the fake tensors of its inputs."""
    from torch._guards import detect_fake_mode

    args = fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val"))
    flat = [v for v in fx.node.map_aggregate(args, lambda v: v) if isinstance(v, Tensor)]
    mode = detect_fake_mode(flat) if flat else None
    if mode is None or not callable(node.target):
        return
    try:
        with mode:
            node.meta["val"] = node.target(*args, **kwargs)
    except Exception:  # no value known: the rewrites that need one skip the node
        node.meta.pop("val", None)


def _expanded_dims(ex: fx.Node) -> set[int] | None:
    """The dims ``expand(x, sizes)`` repeats (``x`` has size 1 there), or None if unknown."""
    x, out = _val(ex.args[0]), _val(ex)
    if x is None or out is None or x.dim() != out.dim():
        return None
    return {
        d
        for d in range(out.dim())
        if isinstance(x.shape[d], int) and x.shape[d] == 1 and out.stride()[d] == 0
    }


def _broadcasts_over(other: Any, dims: set[int], rank: int) -> bool:
    """Whether ``other`` (a scalar or a tensor node) has size 1 (or no dim) at ``dims``."""
    if not isinstance(other, fx.Node):
        return not isinstance(other, (list, tuple))
    val = other.meta.get("val")
    if not isinstance(val, Tensor):
        return True  # a symbolic scalar
    for d in dims:
        i = d - (rank - val.dim())
        if i >= 0 and not (isinstance(val.shape[i], int) and val.shape[i] == 1):
            return False
    return True


def _spans(other: Any, out: Tensor, dims: set[int]) -> bool:
    """Whether tensor ``other`` has ``out``'s (symbolic) size at every dim in ``dims``.

    Then ``f(expand(x), other) == f(x, other)`` by broadcasting alone.
    """
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    val = other.meta.get("val") if isinstance(other, fx.Node) else None
    if not isinstance(val, Tensor) or val.dim() != out.dim() or not dims:
        return False
    return all(statically_known_true(val.shape[d] == out.shape[d]) for d in dims)


def _insert(
    graph: fx.Graph,
    anchor: fx.Node,
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
) -> fx.Node:
    with graph.inserting_before(anchor):
        new = graph.call_function(target, args, dict(kwargs or {}))
    _infer(new)
    return new


def _until_fixed(gm: fx.GraphModule, rewrite: Callable[[fx.Graph, fx.Node], bool]) -> int:
    """Applies ``rewrite(graph, node)`` to every node until none changes; returns how many did."""
    graph = gm.graph
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if rewrite(graph, node):
                count += 1
                changed = True
    if count:
        graph.eliminate_dead_code()
        gm.recompile()
    return count


def expand_last(gm: fx.GraphModule) -> int:
    """Moves ``expand`` after the views and elementwise operators applied to its output.

    - ``permute`` / ``slice`` / ``select`` of ``expand(x)`` (along a dim it does
      not repeat) -> ``expand`` of the same view of ``x``;
    - an elementwise operator of ``expand(x)`` and scalars, or tensors of size 1
      in the repeated dims -> ``expand`` of the operator of ``x``.

    Each output element is the same operation on the same values, so the values
    are equal; the work is done on ``x``'s elements instead of the repeated ones.
    The backward of global average pooling expands a per-channel gradient to
    ``h x w`` and then divides, transposes and slices it; Grad-CAM++ multiplies it
    by the per-channel activation sums. With the expand last, that (and every
    guard of it, :func:`sink_nan_guards`) happens ``h w`` times fewer. Results
    written in place later are left alone.
    """
    return _until_fixed(gm, _expand_later)


def _expand_later(graph: fx.Graph, node: fx.Node) -> bool:
    """One step of :func:`expand_last` at ``node``; whether it rewrote it."""
    if node.op != "call_function" or not node.args:
        return False
    casts = node.target == aten._to_copy.default and set(node.kwargs) <= {"dtype"}
    if node.kwargs and not casts:
        return False
    if node.target in _MOVES_PAST_EXPAND:
        operands = [0]
    elif node.target in _ELEMENTWISE:
        operands = [i for i, a in enumerate(node.args[:2]) if isinstance(a, fx.Node)]
    elif node.target in _IN_PLACE_BINARY:
        operands = [1]  # the written tensor is the first
    else:
        return False
    for i in operands:
        ex = node.args[i]
        if not isinstance(ex, fx.Node) or ex.target != aten.expand.default:
            continue
        x, out = ex.args[0], _val(node)
        dims = _expanded_dims(ex)
        if not isinstance(x, fx.Node) or dims is None or out is None:
            continue
        sizes = ex.args[1]
        if not isinstance(sizes, list | tuple) or _written_after(x):
            continue
        rank = len(sizes)
        others = [a for j, a in enumerate(node.args) if j != i]
        binary = node.target in _BINARY and len(node.args) == 2
        if binary and _spans(others[0], out, dims):
            # the other operand has the repeated dims: broadcasting replaces the expand
            args = list(node.args)
            args[i] = x
            direct = _insert(graph, node, node.target, tuple(args), node.kwargs)
            node.replace_all_uses_with(direct)
            graph.erase_node(node)
            return True
        if node.target in _IN_PLACE_BINARY or _written_after(node):
            continue
        if node.target in _MOVES_PAST_EXPAND:
            view_args: Any = node.args  # (x, dims) for permute, (x, dim, ...) for the others
            if node.target == aten.permute.default:
                perm = [int(d) % rank for d in view_args[1]]
                new_sizes = [sizes[d] for d in perm]
            else:
                dim = int(view_args[1] if len(view_args) > 1 else 0) % rank
                if dim in dims:
                    continue
                new_sizes = [-1 if d == dim else s for d, s in enumerate(sizes)]
                if node.target == aten.select.int:
                    del new_sizes[dim]
            inner = _insert(graph, node, node.target, (x, *node.args[1:]))
        else:
            if out.dim() != rank:
                continue
            args = list(node.args)
            args[i] = x
            if not all(_broadcasts_over(o, dims, rank) for o in others):
                continue
            inner = _insert(graph, node, node.target, tuple(args), node.kwargs)
            new_sizes = [s if d in dims else -1 for d, s in enumerate(sizes)]
        if _val(inner) is None:
            graph.erase_node(inner)
            continue
        moved = _insert(graph, node, aten.expand.default, (inner, new_sizes))
        node.replace_all_uses_with(moved)
        graph.erase_node(node)
        return True
    return False


def sink_nan_guards(gm: fx.GraphModule) -> int:
    """Moves each NaN guard below views and ReLUs, onto the smallest tensor; returns how many.

    ``guard(view(x)) == view(guard(x))`` because the guard is elementwise and a
    view only selects or repeats elements; ``guard(relu(x)) == relu(guard(x))``
    (NaN -> 0, +inf -> the largest float, -inf -> 0 either way). The gradients
    of a GAP head's layer are one value per channel repeated over ``h x w``:
    guarded before the repeat, the guard reads ``h w`` times fewer values, and
    the guards of several maps meet on the same tensor (then one remains,
    common-subexpression elimination). Tensors written in place later are left alone.
    """
    return _until_fixed(gm, _guard_sooner)


def _guard_sooner(graph: fx.Graph, node: fx.Node) -> bool:
    """One step of :func:`sink_nan_guards` at ``node``; whether it moved a guard."""
    if not _is_guard(node):
        return False
    x = node.args[0]
    if not isinstance(x, fx.Node) or x.op != "call_function":
        return False
    if not (x.target in _VIEWS or _is_relu(x)):
        return False
    inner = x.args[0]
    if not isinstance(inner, fx.Node) or not _same_dtype(inner, x):
        return False
    if _written_after(inner) or _written_after(x) or _written_after(node):
        return False
    guarded = _insert(graph, node, node.target, (inner, *node.args[1:]), node.kwargs)
    moved = _insert(graph, node, x.target, (guarded, *x.args[1:]), x.kwargs)
    node.replace_all_uses_with(moved)
    graph.erase_node(node)
    return True


def _finite(node: Any) -> bool:
    """Whether every value of ``node`` is finite by construction."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if _is_guard(node):
            return not _written_after(node)
        if node.target in _VIEWS or _is_relu(node):
            node = node.args[0]
            continue
        return False
    return False


def drop_redundant_guards(gm: fx.GraphModule) -> int:
    """Removes guards of tensors that are finite already (a guard of a guarded tensor)."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if _is_guard(node) and _finite(node.args[0]):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            count += 1
    if count:
        gm.recompile()
    return count


def decompose_nan_guards(gm: fx.GraphModule) -> int:
    """Turns every remaining ``nan_to_num`` into :func:`nan_to_num`'s three passes."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.nan_to_num.default:
            node.target = nan_to_num
            count += 1
    if count:
        gm.recompile()
    return count


def unbatched_matmuls(gm: fx.GraphModule) -> int:
    """Rewrites ``bmm(a, expand(w))`` of a 2-D ``w`` to ``matmul(a, w)``; returns how many.

    ``vmap`` over the K target cotangents turns the backward of a linear layer
    into a ``bmm`` with the weight copied K times (for a 2048 x 1000 head and
    K = 6, 49 MB written per call). ``matmul`` broadcasts the weight instead:
    the same values, without the copies.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.bmm.default:
            continue
        rhs = node.args[1]
        while isinstance(rhs, fx.Node) and rhs.target == aten.view.default:
            rhs = rhs.args[0]
        if not isinstance(rhs, fx.Node) or rhs.target != aten.expand.default:
            continue
        base = rhs.args[0]
        bval, eval_ = _val(base), _val(rhs)
        if bval is None or eval_ is None:
            continue
        # a 2-D weight broadcast along a new leading batch dimension, nothing else
        if bval.dim() != 2 or eval_.dim() != 3 or eval_.stride()[1:] != bval.stride():
            continue
        if eval_.stride()[0] != 0:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(aten.matmul.default, (node.args[0], base))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def _cse(gm: fx.GraphModule) -> fx.GraphModule:
    from torch.fx.passes.dialect.common.cse_pass import CSEPass

    out: fx.GraphModule = CSEPass().call(gm).graph_module
    # the pass builds a new graph; keep make_fx's calling convention (nested lists in)
    out.graph._codegen = gm.graph._codegen
    out.recompile()
    return out


def optimize(gm: fx.GraphModule) -> fx.GraphModule:
    """All of the above, in order: unbatched matmuls, guards moved onto the smallest
    tensors, repeated subexpressions removed (the engine's method functions each
    guard the same activations and gradients), guards of guarded tensors dropped,
    and the remaining guards decomposed for ONNX."""
    unbatched_matmuls(gm)
    expand_last(gm)
    sink_nan_guards(gm)
    out = _cse(gm)
    drop_redundant_guards(out)
    decompose_nan_guards(out)
    return out

"""The exporter's graph rewrites: exact, and they remove the work they target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from camserve.engine.methods import method_spec
from camserve.engine.methods.gradient import gradcampp
from camserve.export import export_onnx
from camserve.export.passes import (
    TRACE_DECOMPOSITIONS,
    copysign,
    expand_last,
    optimize,
    sink_nan_guards,
)
from camserve.export.passes import nan_to_num as _nan_to_num
from camserve.export.passes import unbatched_matmuls as _unbatched_matmuls


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_three_pass_nan_guard_equals_nan_to_num(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    x = torch.tensor(
        [0.0, -0.0, 1.5, -2.25, float("nan"), float("inf"), -float("inf"), info.max, info.min],
        dtype=dtype,
    )
    got, want = _nan_to_num(x), torch.nan_to_num(x, nan=0.0)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    assert torch.equal(_nan_to_num(x, nan=7.0), torch.nan_to_num(x, nan=7.0))
    # explicit +-inf replacements keep aten's own nan_to_num
    assert torch.equal(_nan_to_num(x, 0.0, 3.0, -3.0), torch.nan_to_num(x, 0.0, 3.0, -3.0))


def _head_vjp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gradients of 3 logits of a GAP + linear head w.r.t. its input, by vmap over a VJP."""

    def head(d: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear((x + d).mean(dim=(2, 3)), w, b)

    _, vjp = torch.func.vjp(head, torch.zeros_like(x))
    cot = torch.eye(w.shape[0])[None, :3].expand(x.shape[0], 3, w.shape[0])
    (grads,) = torch.func.vmap(vjp, in_dims=1, out_dims=1)(cot)
    return grads


def test_the_weight_of_a_linear_head_is_no_longer_copied_per_target() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 16, 4, 4), torch.randn(10, 16), torch.randn(10)
    graph = make_fx(_head_vjp, tracing_mode="symbolic")(x, w, b)
    bmm = torch.ops.aten.bmm.default
    assert any(n.target == bmm for n in graph.graph.nodes)  # vmap's rule copies the weight
    assert _unbatched_matmuls(graph) == 1
    assert not any(n.target == bmm for n in graph.graph.nodes)
    for n in (2, 5):  # still symbolic in the batch
        x2 = torch.randn(n, 16, 4, 4)
        torch.testing.assert_close(graph(x2, w, b), _head_vjp(x2, w, b), rtol=0, atol=1e-6)


def test_an_exported_graph_guards_nan_once_per_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    report = export_onnx(model, torch.randn(2, 3, 16, 16), "3", tmp_path / "m.onnx", targets=3)
    graph = onnx.load(str(report.path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "IsInf" not in ops  # +-inf are clipped, not tested for
    # one guard per distinct tensor: the seven maps share the activations' guard
    guarded = [n.input[0] for n in graph.node if n.op_type == "IsNaN"]
    assert len(guarded) == len(set(guarded))
    # no copy of the head's weight (or of its transpose) per target
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    weights |= {
        n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights
    }
    assert not any(n.op_type == "Expand" and n.input[0] in weights for n in graph.node)
    assert all(np.isfinite(v) and v <= report.tolerance for v in report.max_abs_diff.values())


def test_copysign_without_where_equals_torch_copysign() -> None:
    mags = torch.tensor([0.0, 1.5, -2.25, float("inf"), -float("inf"), 3.4e38, 1e-45])
    signs = torch.tensor([0.0, 2.0, -3.0, float("inf"), -float("inf"), -1e-30, 5.0])
    a, b = torch.meshgrid(mags, signs, indexing="ij")
    assert torch.equal(copysign(a, b), torch.copysign(a, b))
    nan = copysign(torch.tensor([float("nan")]), torch.tensor([-1.0]))
    assert torch.isnan(nan).all()


_SPECIALS = [float("nan"), float("inf"), -float("inf"), 3.0e38, -3.0e38, 0.0, -1.5, 2.0]


def _special(*shape: int) -> torch.Tensor:
    """Random values with NaN, +-inf and values that overflow when doubled, spread about."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[: len(_SPECIALS) * 2]
    flat[idx] = torch.tensor(_SPECIALS * 2)[: idx.numel()]
    return x


def _gap_backward_maps(g: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The shape of the traced graph: a GAP head's gradient expanded, divided, permuted and
    sliced, then guarded by several method functions (HiResCAM, LayerCAM, a double guard)."""
    n, c, h, w = a.shape
    full = g.view(g.shape[0], n, c, 1, 1).expand(g.shape[0], n, c, h, w) / (h * w)
    grads = full.permute(1, 0, 2, 3, 4)[:, :-1]
    a = torch.nan_to_num(a, nan=0.0)
    hires = torch.nan_to_num((torch.nan_to_num(grads, nan=0.0) * a[:, None]).sum(dim=2), nan=0.0)
    layer = (torch.nan_to_num(grads.clamp(min=0), nan=0.0) * a[:, None]).sum(dim=2)
    twice = torch.nan_to_num(torch.nan_to_num(layer, nan=0.0).clamp(min=0), nan=0.0)
    return hires, twice


def _traced(fn: Any, *args: torch.Tensor) -> torch.fx.GraphModule:
    """``fn`` traced as the exporter traces (symbolic shapes, ``nan_to_num`` kept whole)."""
    gm: torch.fx.GraphModule = make_fx(
        fn, decomposition_table=TRACE_DECOMPOSITIONS, tracing_mode="symbolic"
    )(*args)
    return gm


def _guards(gm: torch.fx.GraphModule) -> list[int]:
    """Element counts (at the traced example) of the tensors a guard reads."""
    out = []
    for node in gm.graph.nodes:
        if node.target in (torch.ops.aten.nan_to_num.default, _nan_to_num):
            out.append(int(node.args[0].meta["val"].numel().node.hint))
    return out


def test_guards_move_onto_the_unexpanded_gradient_and_the_values_stay_the_same() -> None:
    g, a = _special(4, 2, 8), _special(2, 8, 5, 5)
    traced = _traced(_gap_backward_maps, g, a)
    before = _guards(traced)
    full = 2 * 3 * 8 * 5 * 5  # the sliced, expanded gradient
    assert before.count(full) == 2  # HiResCAM's and LayerCAM's guards
    out = optimize(traced)
    after = _guards(out)
    assert full not in after and 4 * 2 * 8 in after  # guarded before the expand, once
    assert len(after) < len(before)
    assert not any(n.target == torch.ops.aten.nan_to_num.default for n in out.graph.nodes)
    for args in ((g, a), (_special(4, 3, 8), _special(3, 8, 5, 5))):
        want = _gap_backward_maps(*args)
        got = out(*args)
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)
            assert torch.isfinite(x).all()


def _written_later(x: torch.Tensor) -> torch.Tensor:
    """A guard of a view whose base is written in place after the view is taken."""
    base = x * 1.0
    view = base[:, :2]
    base.mul_(2.0)
    return torch.nan_to_num(view.clamp(min=0), nan=0.0)


def test_a_guard_stays_put_when_its_tensor_is_written_in_place_later() -> None:
    x = _special(3, 4)
    traced = make_fx(_written_later, decomposition_table=TRACE_DECOMPOSITIONS)(x)
    assert sink_nan_guards(traced) == 0
    out = optimize(traced)
    assert torch.equal(out(x), _written_later(x))


def _family_of_a_gap_gradient(g: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The engine's own method functions on a gradient shaped as a GAP head's backward."""
    n, c, h, w = a.shape
    full = g.view(g.shape[0], n, c, 1, 1).expand(g.shape[0], n, c, h, w) / (h * w)
    grads = full.permute(1, 0, 2, 3, 4)[:, :-1]
    maps = [method_spec(m).function(a, grads) for m in ("gradcam", "xgradcam", "layercam")]
    maps.append(method_spec("hirescam").function(a, grads))
    maps.append(gradcampp(a, grads)[0])
    return tuple(maps)


def _materialized(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every ``expand`` written out, as ONNX's Expand does (in torch a reduction
    over a stride-0 view may sum in another order, rounding differently)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target == torch.ops.aten.expand.default:
            with graph.inserting_after(node):
                copy = graph.call_function(torch.ops.aten.clone.default, (node,))
            node.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
    gm.recompile()
    return gm


def test_the_gradient_family_reads_the_unexpanded_gradient_with_the_same_values() -> None:
    g, a = _special(4, 2, 8), _special(2, 8, 5, 5)
    traced = _traced(_family_of_a_gap_gradient, g, a)
    full = 2 * 3 * 8 * 5 * 5
    assert full in _guards(traced)
    assert expand_last(traced) > 0
    out = _materialized(optimize(traced))
    # Grad-CAM++'s sum A g term, LayerCAM's and HiResCAM's weights: guarded unexpanded
    assert full not in _guards(out)
    for args in ((g, a), (_special(4, 3, 8), _special(3, 8, 5, 5))):
        want = _family_of_a_gap_gradient(*args)
        got = out(*args)
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)

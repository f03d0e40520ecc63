"""The exporter's graph rewrites: exact, and they remove the work they target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from camserve.export import export_onnx
from camserve.export.exporter import _nan_to_num, _unbatched_matmuls


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

"""Cutting a model after a layer with ``torch.fx`` so that only the part after it re-runs.

Ablation-CAM re-runs the network on ablated activations. Only the nodes that
depend on the layer's output need re-running (the "tail"); the values from
before the cut that the tail uses (skip connections, extra model inputs) are
recorded during the one forward (the "frontier") and handed to the tail.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["SplitModel", "find_cam_head", "trace_split"]

# fx tracing patches torch.nn.Module.__call__ globally while it runs.
_TRACE_LOCK = threading.Lock()


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaves or super().is_leaf_module(
            m, module_qualified_name
        )


@dataclass(frozen=True)
class _Cut:
    frontier: tuple[int, ...]
    tail: fx.GraphModule
    # When the tail ends in an ``nn.Linear`` whose output is the model output:
    # the tail up to that Linear's input, and the Linear itself.
    features: fx.GraphModule | None = None
    head: nn.Linear | None = None


@dataclass(frozen=True)
class SplitModel:
    """A traced model that records its frontier values, and one tail per layer.

    Attributes:
        recorder: runs like the model and returns ``(output, frontier_values)``.
        cuts: layer name -> (indices of its frontier values, tail module). The
            tail is called as ``tail(activation, *frontier_values)``.
        reasons: layer name -> why it could not be cut (fallback: full re-run).
    """

    recorder: fx.GraphModule
    cuts: dict[str, _Cut]
    reasons: dict[str, str]

    def tail(self, layer: str, act: Tensor, frontier: Sequence[Any]) -> Any:
        """Run the part of the network after ``layer`` on ``act``."""
        cut = self.cuts[layer]
        return cut.tail(act, *(frontier[j] for j in cut.frontier))

    def head(self, layer: str) -> nn.Linear | None:
        """The final ``nn.Linear`` of the tail after ``layer`` (its output is the model output)."""
        return self.cuts[layer].head

    def tail_features(self, layer: str, act: Tensor, frontier: Sequence[Any]) -> Tensor:
        """Run the tail after ``layer`` up to the input of its final Linear (see :meth:`head`)."""
        cut = self.cuts[layer]
        if cut.features is None:
            raise ValueError(f"the tail after {layer!r} does not end in an nn.Linear")
        out = cut.features(act, *(frontier[j] for j in cut.frontier))
        if not isinstance(out, Tensor):  # pragma: no cover - the graph returns one node
            raise TypeError(f"the tail's features are a {type(out).__name__}, not a Tensor")
        return out


def _descendants(nodes: list[fx.Node], start: fx.Node) -> set[fx.Node]:
    seen = {start}
    after = False
    for node in nodes:
        if node is start:
            after = True
            continue
        if after and any(inp in seen for inp in node.all_input_nodes):
            seen.add(node)
    seen.discard(start)
    return seen


def _tail_graph(
    nodes: list[fx.Node], start: fx.Node, desc: set[fx.Node], frontier: list[fx.Node]
) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder("activation")}
    for i, node in enumerate(frontier):
        env[node] = g.placeholder(f"frontier_{i}")
    needed = {inp for node in desc for inp in node.all_input_nodes}
    for node in nodes:
        if node in desc or (node.op == "get_attr" and node in needed):
            env[node] = g.node_copy(node, lambda n: env[n])
    return g


def _split_head(root: nn.Module, g: fx.Graph) -> tuple[fx.GraphModule | None, nn.Linear | None]:
    """Cut the final ``nn.Linear`` off a tail graph whose output is that Linear's output.

    Returns the graph up to the Linear's input and the Linear, or ``(None, None)``
    when the output is anything else (a tuple, a functional call, a Linear with
    other users or extra arguments).
    """
    out = next(n for n in g.nodes if n.op == "output")
    last = out.args[0]
    if not (
        isinstance(last, fx.Node)
        and last.op == "call_module"
        and isinstance(last.target, str)
        and len(last.args) == 1
        and not last.kwargs
        and isinstance(last.args[0], fx.Node)
        and len(last.users) == 1
    ):
        return None, None
    module = root.get_submodule(last.target)
    if type(module) is not nn.Linear:  # a subclass may change forward
        return None, None
    feat = last.args[0]
    g.erase_node(out)
    g.erase_node(last)
    g.output(feat)
    return fx.GraphModule(root, g), module


def trace_split(model: nn.Module, layers: Sequence[str]) -> tuple[SplitModel | None, str]:
    """Trace ``model`` with the requested layers as leaves and cut it after each.

    Returns:
        The split model (None when tracing fails) and the reason for a failure.
    """
    names = list(dict.fromkeys(layers))
    outer = {n for n in names if not any(n != o and n.startswith(o + ".") for o in names)}
    try:
        with _TRACE_LOCK:
            tracer = _Tracer(outer)
            graph = tracer.trace(model)
    except Exception as exc:  # any tracing failure means: fall back to full re-runs
        return None, f"torch.fx could not trace the model ({type(exc).__name__}: {exc})"
    nodes = list(graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    reasons: dict[str, str] = {}
    frontier_all: list[fx.Node] = []
    plans: dict[str, tuple[fx.Node, set[fx.Node], list[fx.Node]]] = {}
    for name in names:
        calls = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            reasons[name] = f"layer {name!r} appears {len(calls)} times in the traced graph"
            continue
        desc = _descendants(nodes, calls[0])
        if out_node not in desc:
            reasons[name] = f"the output does not depend on layer {name!r}"
            continue
        frontier = [
            n
            for n in nodes
            if n not in desc
            and n is not calls[0]
            and n.op != "get_attr"
            and any(u in desc for u in n.users)
        ]
        plans[name] = (calls[0], desc, frontier)
        frontier_all.extend(n for n in frontier if n not in frontier_all)
    # The recorder: the same graph, also returning the frontier values.
    rec = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "output":
            result = fx.map_arg(node.args[0], lambda n: env[n])
            rec.output((result, tuple(env[n] for n in frontier_all)))
        else:
            env[node] = rec.node_copy(node, lambda n: env[n])
    root = tracer.root
    cuts: dict[str, _Cut] = {}
    for name, (start, desc, frontier) in plans.items():
        tail = fx.GraphModule(root, _tail_graph(nodes, start, desc, frontier))
        features, head = _split_head(root, _tail_graph(nodes, start, desc, frontier))
        cuts[name] = _Cut(tuple(frontier_all.index(n) for n in frontier), tail, features, head)
    return SplitModel(fx.GraphModule(root, rec), cuts, reasons), ""


def find_cam_head(model: nn.Module, act: Tensor, logits: Tensor) -> Tensor | None:
    """The weight ``(C_out, C)`` of a linear layer ``L`` with ``logits = L(GAP(act))``, if any.

    CAM (000 sec. 3) needs the class score to be a linear function of the
    globally average-pooled activations. Every ``nn.Linear`` of the model
    whose shape fits is checked numerically against this forward, so the test
    holds whatever the code of the head looks like (module, functional, fx or not).
    """
    if logits.dim() != 2:
        return None
    pooled = act.detach().double().mean(dim=(2, 3))
    target = logits.detach().double()
    tol = 1e-4 * (1.0 + float(target.abs().max())) if target.numel() else 1e-4
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight.detach()
        if tuple(weight.shape) != (target.shape[1], pooled.shape[1]):
            continue
        bias = module.bias.detach().double() if module.bias is not None else None
        pred = torch.nn.functional.linear(pooled, weight.double().to(pooled.device), bias)
        if torch.allclose(pred, target, rtol=1e-4, atol=tol):
            return weight
    return None

"""The callables handed to re-running methods: fx tail, full-forward score, input gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.engine.runners import Runner
from camserve.engine.targets import Target
from tests.engine._nets import ResNetish, Vqa, vgg_net


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()))), float(
        (a - b).abs().max()
    )


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = vgg_net()

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out if bool(out.sum() > -1e9) else -out


def _runner(ex: Explainer, inputs: tuple[Tensor, ...], ids: Tensor, fx: bool) -> Runner:
    frontier = None
    if fx:
        assert ex._split is not None
        _, frontier = ex._split.recorder(*inputs)
    return Runner(ex.model, inputs, Target(ids, "logit"), ex._split if fx else None, frontier)


def test_fx_tail_with_a_skip_connection_runs_only_the_tail() -> None:
    model = ResNetish().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ex = Explainer(model, "block1.conv1")
    assert ex._split is not None and "block1.conv1" in ex._split.cuts
    ids = torch.tensor([[0, 3], [4, 1]])
    fx_runner = _runner(ex, (x,), ids, fx=True)
    assert fx_runner.uses_fx("block1.conv1")
    acts = torch.randn(3, 8, 8, 8, dtype=torch.float64)
    for i in range(2):
        got = fx_runner.tail("block1.conv1")(i, acts)
        with torch.no_grad():  # by hand: the rest of block 1 (skip from the stem), block 2, head
            stem = torch.relu(model.stem(x[i : i + 1])).expand(3, -1, -1, -1)
            b1 = torch.relu(model.block1.conv2(F.relu(acts)) + stem)
            out = model.fc(F.adaptive_avg_pool2d(model.block2(b1), 1).flatten(1))
        close(got, out[:, ids[i]])
        close(_runner(ex, (x,), ids, fx=False).tail("block1.conv1")(i, acts), got)
    # the tail never runs the stem: a stem that fails after the forward is not called
    model.stem.register_forward_hook(
        lambda m, a, o: (_ for _ in ()).throw(AssertionError("stem ran"))
    )
    fx_runner.tail("block1.conv1")(0, acts)


def test_fx_tail_takes_extra_inputs_from_the_recorded_forward() -> None:
    model = Vqa().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    q = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ex = Explainer(model, "features")
    ids = torch.tensor([[0, 1], [2, 3]])
    acts = torch.rand(4, 8, 8, 8, dtype=torch.float64)
    for i in range(2):
        got = _runner(ex, (x, q), ids, fx=True).tail("features")(i, acts)
        with torch.no_grad():
            qv = torch.tanh(model.embed(q[i : i + 1]).mean(dim=1))
            ref = model.out(acts.mean(dim=(2, 3)) * qv)[:, ids[i]]
        close(got, ref)
        close(_runner(ex, (x, q), ids, fx=False).tail("features")(i, acts), ref)


def test_untraceable_model_falls_back_to_full_reruns() -> None:
    model = Untraceable().double()
    ex = Explainer(model, "net.features.3")
    assert ex._split is None and "could not trace" in ex.trace_note
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    ids = torch.tensor([[2]])
    acts = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    got = _runner(ex, (x,), ids, fx=False).tail("net.features.3")(0, acts)
    with torch.no_grad():
        ref = model.net.classifier(F.relu(acts).flatten(1))[:, 2:3]
    close(got, ref)


def test_score_and_input_grad_callables() -> None:
    model = Vqa().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    q = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ids = torch.tensor([[0, 1], [3, 2]])
    runner = Runner(model, (x, q), Target(ids, "probability"), None, None)
    variants = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.softmax(model(variants, q[1:2].expand(3, -1)), 1)[:, ids[1]]
    close(runner.score(1, variants), ref)
    scores, grads = runner.input_grad(1, variants)
    close(scores, ref)
    assert grads.shape == (3, 2, 3, 16, 16)
    for j in range(2):
        v = variants.clone().requires_grad_()
        (g,) = torch.autograd.grad(
            torch.softmax(model(v, q[1:2].expand(3, -1)), 1)[:, ids[1, j]].sum(), v
        )
        close(grads[:, j], g)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("form", ["score", "sum"])
@pytest.mark.parametrize("make", [vgg_net, Untraceable])
def test_ablationcam_end_to_end(form: str, make) -> None:
    model = make().double()
    layer = "features.3" if make is vgg_net else "net.features.3"
    head = model.classifier if make is vgg_net else model.net.classifier
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ex = Explainer(model, layer, batch_size=3)
    res = ex.explain(x, methods=["ablationcam"], targets=2, options={"ablationcam": {"form": form}})
    with torch.no_grad():
        a = model.get_submodule(layer)(model.get_submodule(layer.replace(".3", ""))[:3](x))
        for i in range(2):
            for j in range(2):
                c = int(res.target_ids[i, j])
                s = head(F.relu(a[i : i + 1]).flatten(1))[0, c]
                ref = torch.zeros(8, 8, dtype=torch.float64)
                for k in range(a.shape[1]):
                    ab = a[i : i + 1].clone()
                    ab[0, k] = 0
                    drop = s - head(F.relu(ab).flatten(1))[0, c]
                    ref += drop / (s if form == "score" else a[i, k].sum()) * a[i, k]
                close(res.map("ablationcam")[i, j], ref.clamp(min=0))

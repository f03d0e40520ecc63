"""Hooks live for one call; the model is left exactly as it was; threads never mix."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from camserve.engine import Explainer
from tests.engine._nets import ResNetish, gap_net, vgg_net

ALL_GRADIENT = ["gradcam", "gradcampp", "xgradcam", "gradcam_guidedrelu", "guided_gradcam", "cam"]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, p.grad is None) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        ],
        "attrs": [(n, sorted(vars(m))) for n, m in model.named_modules()],
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("training", "requires_grad", "grads", "hooks", "attrs"):
        assert before[key] == after[key], key
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


@pytest.mark.parametrize("train", [False, True])
def test_model_unchanged_after_success(train: bool) -> None:
    model = gap_net().train(train)
    model.features[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    seen: list[int] = []
    model.fc.register_forward_hook(lambda m, a, o: seen.append(1))  # the user's own hook stays
    before = _snapshot(model)
    ex = Explainer(model, ["features", "features.2"])
    res = ex.explain(
        torch.randn(2, 3, 16, 16), methods=["gradcam", "gradcampp", "xgradcam"], targets=2
    )
    Explainer(model, "features").explain(torch.randn(2, 3, 16, 16), methods=ALL_GRADIENT, targets=2)
    assert res.map("gradcam").shape == (2, 2, 8, 8)
    assert seen  # the user's hook still ran
    assert torch.is_grad_enabled()
    _assert_same(before, _snapshot(model))


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


def test_hooks_removed_and_grad_mode_restored_after_an_exception() -> None:
    model = vgg_net()
    model.classifier.insert(0, Boom())
    before = _snapshot(model)
    ex = Explainer(model, "features.3")
    model.classifier[0].armed = True
    with pytest.raises(RuntimeError, match="boom"):
        ex.explain(torch.randn(1, 3, 16, 16), methods=["gradcam", "guided_gradcam"])
    assert torch.is_grad_enabled()
    model.classifier[0].armed = False
    _assert_same(before, _snapshot(model))
    # and a score function that fails after the forward
    with pytest.raises(ZeroDivisionError):
        ex.explain(torch.randn(1, 3, 16, 16), targets=lambda out: 1 / 0)
    _assert_same(before, _snapshot(model))
    # the explainer still works afterwards, and the model runs plainly
    assert ex.explain(torch.randn(1, 3, 16, 16)).map("gradcam").shape == (1, 1, 8, 8)
    with torch.no_grad():
        assert not model(torch.randn(1, 3, 16, 16)).requires_grad


class Rendezvous(nn.Module):
    """Makes two threads meet inside the forward, so their calls truly overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier: threading.Barrier | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.barrier is not None:
            self.barrier.wait(timeout=20)
        return x


def test_concurrent_calls_never_mix_activations() -> None:
    model = vgg_net()
    model.features.insert(4, Rendezvous())  # between the layer (conv 3) and its ReLU
    model.classifier.insert(0, Rendezvous())
    ex = Explainer(model, "features.3")
    methods = ["gradcam", "gradcampp", "gradcam_guidedrelu", "guided_backprop"]
    xs = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    alone = [ex.explain(x, methods=methods, targets=2) for x in xs]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(xs))
    model.features[4].barrier = barrier
    model.classifier[0].barrier = barrier

    def work(i: int) -> None:
        try:
            results[i] = ex.explain(xs[i], methods=methods, targets=2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    model.features[4].barrier = None
    model.classifier[0].barrier = None
    assert not errors, errors
    for i, ref in enumerate(alone):
        got = results[i]
        assert torch.equal(got.target_ids, ref.target_ids)
        for layer, maps in ref.maps.items():
            for m, v in maps.items():
                assert torch.allclose(got.maps[layer][m], v, atol=1e-6), (i, layer, m)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_other_threads_calling_the_model_are_untouched() -> None:
    model = ResNetish()
    gate = Rendezvous()
    model.block1.conv2 = nn.Sequential(model.block1.conv2, gate)
    ex = Explainer(model, "block1.conv1")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    gate.barrier = threading.Barrier(2)
    plain: dict[str, Tensor] = {}

    def other() -> None:
        with torch.no_grad():
            plain["out"] = model(x)

    t = threading.Thread(target=other)
    t.start()
    ex.explain(x, methods=["gradcam", "guided_backprop"])
    t.join(timeout=30)
    assert torch.allclose(plain["out"], expected)
    assert not plain["out"].requires_grad


def test_relu_routing_is_thread_local() -> None:
    """Guided/deconv ReLU routing applies to the calling thread only."""
    from camserve.engine.relu import ReluRouting, ReluState

    inside, done = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def other() -> None:
        inside.wait(timeout=20)
        y = torch.relu(torch.randn(3, requires_grad=True))
        seen["other"] = type(y.grad_fn).__name__
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with ReluRouting(ReluState()):
        inside.set()
        done.wait(timeout=20)
        seen["mine"] = type(torch.relu(torch.randn(3, requires_grad=True)).grad_fn).__name__
    t.join(timeout=20)
    assert seen == {"other": "ReluBackward0", "mine": "_SwitchReLUBackward"}

"""Ablation-CAM's tail evaluates a final ``nn.Linear`` only on the target rows (same maps)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from camserve.engine import Explainer
from tests.engine._nets import ResNetish, Vqa, gap_net, vgg_net


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(m: nn.Module, args: object, out: Tensor) -> None:
        calls[0] += int(out.shape[0])  # rows the module computed

    module.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("form", ["score", "sum"])
@pytest.mark.parametrize(
    ("make", "layer", "head"),
    [
        (ResNetish, "block2", "fc"),
        (ResNetish, "block1.conv1", "fc"),
        (gap_net, "features", "fc"),
        (vgg_net, "features.3", "classifier.2"),
    ],
)
def test_restricted_head_gives_the_same_maps(make, layer: str, head: str, form: str) -> None:
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    model = make().double()
    fast = Explainer(model, layer, batch_size=3)
    full = Explainer(model, layer, batch_size=3, restrict_head=False)
    assert fast._split is not None and fast._split.head(layer) is model.get_submodule(head)
    opts = {"ablationcam": {"form": form}}
    fast.explain(x, methods=["ablationcam"], targets=2, options=opts)  # proves the cut once
    assert fast.trace_note == ""
    calls = _count_calls(model.get_submodule(head))
    got = fast.explain(x, methods=["ablationcam"], targets=2, options=opts)
    assert calls[0] == 3  # only the prediction forward ran the full head
    ref = full.explain(x, methods=["ablationcam"], targets=2, options=opts)
    assert calls[0] > 6  # the unrestricted tail runs the head on every ablated copy
    assert torch.equal(got.target_ids, ref.target_ids)
    torch.testing.assert_close(got.map("ablationcam"), ref.map("ablationcam"), rtol=1e-6, atol=1e-9)
    assert float(got.map("ablationcam").abs().max()) > 0


def test_float32_and_given_class_ids() -> None:
    model = ResNetish()
    x = torch.randn(2, 3, 16, 16)
    ids = [[4, 0, 2], [1, 1, 3]]
    got = Explainer(model, "block2").explain(x, methods=["ablationcam"], targets=ids)
    ref = Explainer(model, "block2", restrict_head=False).explain(
        x, methods=["ablationcam"], targets=ids
    )
    torch.testing.assert_close(got.map("ablationcam"), ref.map("ablationcam"), rtol=1e-4, atol=1e-6)


def test_probabilities_and_score_functions_use_the_full_head() -> None:
    model = ResNetish().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    calls = _count_calls(model.fc)
    ex = Explainer(model, "block2", batch_size=4)
    ex.explain(x, methods=["ablationcam"], targets=2, score="probability")
    assert calls[0] > 1  # softmax needs every logit
    calls[0] = 0
    ex.explain(x, methods=["ablationcam"], targets=lambda out: out[:, :2] - out[:, 2:4])
    assert calls[0] > 1


def test_heads_that_are_not_a_final_linear_are_left_alone() -> None:
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = gap_net()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x) * 2.0  # the Linear is not the output

    ex = Explainer(TwoOutputs(), "net.features")
    assert ex._split is not None and ex._split.head("net.features") is None
    # a Linear with extra inputs to its output (VQA: image x question) is still a final Linear
    vqa = Explainer(Vqa(), "features")
    assert vqa._split is not None and vqa._split.head("features") is vqa.model.out

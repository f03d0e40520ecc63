"""The method registry: one MethodSpec per method id, the only table the explainer reads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from camserve.engine import Explainer, list_methods
from camserve.engine.methods import (
    METHOD_SPECS,
    MethodSpec,
    OptionSpec,
    check_options,
    gradient,
    method_spec,
    option_names,
)
from camserve.errors import InvalidRequestError, UnknownNameError
from tests.engine._nets import ResNetish, vgg_net

RERUN = {"ablationcam", "scorecam", "occlusion", "integrated_gradients", "gradient_shap"}


def test_every_method_has_one_spec_and_guided_products_inherit_their_map() -> None:
    assert list(METHOD_SPECS) == list_methods()
    for mid, spec in METHOD_SPECS.items():
        assert spec.id == mid and method_spec(mid) is spec
        assert spec.cost == ("rerun" if spec.rerun else "single_pass")
        assert callable(spec.function) and spec.source
        if spec.base is not None:
            base = METHOD_SPECS[spec.base]
            assert mid == f"guided_{spec.base}" and spec.resolution == "input"
            assert spec.input_gradient and spec.rerun == base.rerun and spec.cost == base.cost
            assert set(base.options) | {"reduce"} == set(spec.options)
    for mid in RERUN:
        assert METHOD_SPECS[mid].cost == "rerun" and METHOD_SPECS[mid].rerun == mid
    # Guided Score-CAM and Guided Ablation-CAM cost a Score-CAM / an Ablation-CAM
    assert method_spec("guided_scorecam").cost == "rerun"
    assert method_spec("guided_ablationcam").cost == "rerun"
    assert method_spec("guided_gradcam").cost == "single_pass"
    assert method_spec("gradcam_guidedrelu").gradients == {"guided"}
    assert method_spec("gradcampp").logit_gradient and method_spec("gradcampp").returns_stats
    assert method_spec("occlusion").resolution == "input"
    assert option_names("integrated_gradients") == ["baseline", "batch_size", "rule", "steps"]
    with pytest.raises(UnknownNameError, match="unknown method 'nope'"):
        method_spec("nope")


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"integrated_gradients": {"steps": 0}}, InvalidRequestError, r"steps must be >= 1, got 0"),
        ({"integrated_gradients": {"steps": 5000}}, InvalidRequestError, r"<= 1024, got 5000"),
        ({"gradient_shap": {"stdev": -0.1}}, InvalidRequestError, r"stdev must be >= 0, got -0.1"),
        ({"occlusion": {"fill": math.nan}}, InvalidRequestError, r"fill must be a finite number"),
        ({"occlusion": {"mask": True}}, InvalidRequestError, r"mask must be int, got True"),
        ({"scorecam": {"batch_size": 0}}, InvalidRequestError, r"batch_size must be >= 1"),
        ({"ablationcam": {"form": "max"}}, UnknownNameError, r"unknown ablationcam.form value"),
        ({"guided_gradcam": {"reduce": "mean"}}, UnknownNameError, r"guided_gradcam.reduce"),
        ({"gradcam": {"stats": True}}, UnknownNameError, r"unknown option 'gradcam.stats'"),
        ({"gradcampp": "stats"}, InvalidRequestError, r"must be a mapping"),
    ],
)
def test_options_are_checked_against_their_types_and_ranges(
    options: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        check_options(options)  # type: ignore[arg-type]


def test_option_spec_describes_itself() -> None:
    assert OptionSpec((int,), minimum=1, maximum=8).describe() == "int in [1, 8]"
    assert OptionSpec((str,), ("a", "b")).describe() == "str in {a, b}"
    assert method_spec("guided_ablationcam").options["batch_size"].describe() == "int in [1, 4096]"


def test_options_of_guided_products_reach_their_map() -> None:
    model = vgg_net().double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ex = Explainer(model, "features.3")
    both = ex.explain(
        x,
        methods=["guided_gradcampp", "guided_backprop"],
        targets=2,
        options={"guided_gradcampp": {"normalize_alpha": True, "reduce": "sum"}},
    )
    alone = ex.explain(
        x,
        methods=["gradcampp", "guided_backprop"],
        targets=2,
        options={"gradcampp": {"normalize_alpha": True}, "guided_backprop": {"reduce": "sum"}},
    )
    spec = method_spec("guided_gradcampp")
    want = spec.function(alone.map("guided_backprop"), alone.map("gradcampp"))
    torch.testing.assert_close(both.map("guided_gradcampp"), want)
    # guided_backprop keeps its own (default) reduction
    assert not torch.allclose(both.map("guided_backprop"), alone.map("guided_backprop"))


def test_a_new_method_is_one_spec_and_one_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register ``gradcam_sq`` (squared mean-gradient weights): the explainer dispatches it."""

    def gradcam_sq(acts: Tensor, grads: Tensor, *, power: int = 2) -> Tensor:
        weights = grads.mean(dim=(3, 4)) ** power
        return torch.relu(torch.einsum("nkc,nchw->nkhw", weights.double(), acts.double())).float()

    spec = MethodSpec(
        "gradcam_sq", "layer", frozenset({"normal"}), False, None, "single_pass",
        {"power": OptionSpec((int,), minimum=1, maximum=4)}, gradcam_sq, "gradient",
        source="a test method",
    )  # fmt: skip
    monkeypatch.setitem(METHOD_SPECS, "gradcam_sq", spec)
    model = ResNetish().double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ex = Explainer(model, "block2")
    res = ex.explain(
        x, methods=["gradcam_sq", "hirescam"], targets=2, options={"gradcam_sq": {"power": 3}}
    )
    # the same gradients as every other gradient method: hirescam = sum_k g * A
    acts, grads = _acts_and_grads(model, x, res.target_ids)
    torch.testing.assert_close(res.map("gradcam_sq"), gradcam_sq(acts, grads, power=3))
    torch.testing.assert_close(res.map("hirescam"), gradient.hirescam(acts, grads))
    assert res.timings["method.gradcam_sq"] >= 0
    with pytest.raises(InvalidRequestError, match="power must be <= 4"):
        ex.explain(x, methods="gradcam_sq", options={"gradcam_sq": {"power": 5}})


def _acts_and_grads(model: ResNetish, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    store: dict[str, Tensor] = {}

    def hook(m: object, args: object, out: Tensor) -> Tensor:
        store["a"] = out.detach().clone().requires_grad_()
        return store["a"] * 1.0

    h = model.block2.register_forward_hook(hook)
    try:
        grads = []
        for j in range(ids.shape[1]):
            out = model(x)
            (g,) = torch.autograd.grad(out.gather(1, ids[:, j : j + 1]).sum(), store["a"])
            grads.append(g)
    finally:
        h.remove()
    return store["a"].detach(), torch.stack(grads, dim=1)

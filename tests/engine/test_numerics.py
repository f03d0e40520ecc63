"""No NaN or inf ever leaves the engine: zeros, huge values, negative activations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from camserve.engine import Explainer, Explanation
from camserve.engine.maps import normalize, upsample
from camserve.engine.methods import gradient
from camserve.engine.outputs import NonFiniteOutputError
from tests.engine._nets import ResNetish, gap_net, vgg_net

LAYER_GRADIENT = [
    "gradcam",
    "gradcam_pos",
    "gradcampp",
    "xgradcam",
    "layercam",
    "hirescam",
    "counterfactual",
    "gradcam_norelu",
    "gradcam_abs",
    "gradcam_gmp",
    "gradcam_guidedrelu",
    "gradcam_deconvrelu",
    "guided_backprop",
    "guided_gradcampp",
]


def _all_finite(res: Explanation) -> None:
    for layer, maps in res.maps.items():
        for m, v in maps.items():
            assert v.dtype == torch.float32
            assert bool(torch.isfinite(v).all()), (layer, m)
            assert bool(torch.isfinite(res.normalized(m, layer)).all())
            assert bool(torch.isfinite(res.upsampled(m, layer)).all())
    for t in (res.logits, res.probabilities, res.target_scores):
        assert t is not None and bool(torch.isfinite(t).all())
    for st in res.stats.values():
        assert all(v == v and abs(v) != float("inf") for v in st.values())


@pytest.mark.parametrize("fill", [0.0, 1e30, -1e30, 3e38])
@pytest.mark.parametrize(
    ("make", "layer"), [(vgg_net, "features.3"), (gap_net, "features.2"), (ResNetish, "block1")]
)
def test_adversarial_inputs(make, layer, fill: float) -> None:
    x = torch.full((2, 3, 16, 16), fill)
    x[1, :, ::2] = -fill
    model = make()
    with torch.no_grad():
        bad = (~torch.isfinite(model(x))).any(dim=1).nonzero().flatten().tolist()
    ex = Explainer(model, layer)
    if bad:  # the model overflows: a model failure naming the images, never zeros
        with pytest.raises(
            NonFiniteOutputError, match=r"model .* gave a non-finite output .*(NaN|inf)"
        ) as err:
            ex.explain(x, methods=LAYER_GRADIENT, targets=2)
        assert list(err.value.images) == bad
        return
    res = ex.explain(x, methods=LAYER_GRADIENT, targets=2, options={"gradcampp": {"stats": True}})
    assert set(res.stats["gradcampp"]) >= {"alpha_count", "alpha_min", "alpha_max"}
    _all_finite(res)


def test_zero_network_gives_zero_maps() -> None:
    model = vgg_net()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    res = Explainer(model, "features.3").explain(torch.randn(1, 3, 16, 16), methods=LAYER_GRADIENT)
    _all_finite(res)
    for maps in res.maps.values():
        for v in maps.values():
            assert float(v.abs().max()) == 0.0


def _adversarial(n: int = 2, k: int = 2, c: int = 4) -> tuple[Tensor, Tensor]:
    acts = torch.randn(n, c, 5, 5)
    acts[:, 0] = 0.0  # a dead channel
    acts[:, 1] -= acts[:, 1].mean(dim=(1, 2), keepdim=True)  # sums to ~0
    acts[:, 2] = -1e30  # huge negative activations
    grads = torch.randn(n, k, c, 5, 5)
    grads[:, 0] = 0.0
    grads[:, 1, 3] = 1e30
    # exact zero denominators of Grad-CAM++: 2 + sum(A) g = 0
    s = acts[:, 3].sum(dim=(1, 2))
    grads[:, 0, 3] = (-2.0 / s)[:, None, None]
    return acts, grads


@pytest.mark.parametrize(
    "fn",
    [
        gradient.gradcam,
        gradient.gradcam_pos,
        gradient.xgradcam,
        gradient.layercam,
        gradient.hirescam,
        gradient.counterfactual,
        gradient.gradcam_norelu,
        gradient.gradcam_abs,
        gradient.gradcam_gmp,
    ],
)
def test_pure_methods_on_adversarial_tensors(fn) -> None:
    acts, grads = _adversarial()
    out = fn(acts, grads)
    assert out.shape == (2, 2, 5, 5) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(normalize(out)).all())


@pytest.mark.parametrize("normalize_alpha", [False, True])
def test_gradcampp_zero_denominator_and_nan_inputs(normalize_alpha: bool) -> None:
    acts, grads = _adversarial()
    out, stats = gradient.gradcampp(acts, grads, normalize_alpha=normalize_alpha, stats=True)
    assert bool(torch.isfinite(out).all())
    assert all(v == v and abs(v) != float("inf") for v in stats.values())
    acts[0, 0, 0, 0] = float("nan")
    grads[0, 0, 1, 0, 0] = float("inf")
    out, stats = gradient.gradcampp(acts, grads, normalize_alpha=normalize_alpha, stats=True)
    assert bool(torch.isfinite(out).all())


def test_gradcampp_near_zero_denominator_gives_large_but_finite_alpha() -> None:
    """002 sec. 3.4: alphas explode where sum_ab A g is near -2; they must stay finite."""
    acts = torch.ones(1, 1, 2, 2)  # sum A = 4
    grads = torch.full((1, 1, 1, 2, 2), -0.5 + 1e-9)  # 2 + 4 g ~ 4e-9
    out, stats = gradient.gradcampp(acts, grads, stats=True)
    assert bool(torch.isfinite(out).all())
    assert abs(stats["alpha_max"]) > 1e6 or abs(stats["alpha_min"]) > 1e6


def test_normalize_constant_and_extreme_maps() -> None:
    maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 7.0), torch.randn(4, 4) * 3e38])
    out = normalize(maps)
    assert bool(torch.isfinite(out).all())
    assert float(out[0].abs().max()) == 0.0 and float(out[1].abs().max()) == 0.0
    assert float(out[2].min()) == 0.0 and float(out[2].max()) == 1.0
    assert bool(torch.isfinite(upsample(out, (9, 9))).all())

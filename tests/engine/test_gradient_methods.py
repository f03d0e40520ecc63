"""Every gradient method against a slow one-target reference; one pass = separate runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.engine import Explainer
from camserve.engine.maps import normalize, upsample
from tests.engine._nets import ResNetish, gap_net, guided_copy, ref_grad, ref_map, vgg_net

GRADIENT = [
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
]
CASES = [
    (vgg_net, "features.3"),
    (vgg_net, "features"),
    (gap_net, "features.2"),
    (ResNetish, "block1.conv1"),
]


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    scale = max(1.0, float(b.abs().max()))
    assert torch.allclose(a, b, rtol=tol, atol=tol * scale), float((a - b).abs().max())


def images(n: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(
        n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize(("make", "layer"), CASES)
def test_every_gradient_method_matches_its_formula(make, layer) -> None:
    model = make().double()
    x = images()
    res = Explainer(model, layer).explain(x, methods=GRADIENT, targets=3)
    for i in range(2):
        for j in range(3):
            c = int(res.target_ids[i, j])
            a, g, s = ref_grad(model, layer, x[i : i + 1], lambda out, c=c: out[0, c])
            assert abs(float(s) - float(res.target_scores[i, j])) < 1e-5
            for m in GRADIENT:
                close(res.map(m)[i, j], ref_map(m, a[0], g[0]))


def test_probability_scores_and_gradcampp_alphas_from_the_logit() -> None:
    model = vgg_net().double()
    x = images()
    res = Explainer(model, "features.3").explain(
        x, methods=["gradcam", "gradcampp"], targets=2, score="probability"
    )
    probs = torch.softmax(model(x), 1)
    close(res.target_scores, probs.gather(1, res.target_ids))
    for i in range(2):
        for j in range(2):
            c = int(res.target_ids[i, j])
            a, gp, _ = ref_grad(
                model, "features.3", x[i : i + 1], lambda o, c=c: torch.softmax(o, 1)[0, c]
            )
            _, gl, _ = ref_grad(model, "features.3", x[i : i + 1], lambda o, c=c: o[0, c])
            close(res.map("gradcam")[i, j], ref_map("gradcam", a[0], gp[0]))
            close(res.map("gradcampp")[i, j], ref_map("gradcampp", a[0], gp[0], gl[0]))


def test_gradcampp_normalize_alpha_and_stats() -> None:
    model = vgg_net().double()
    x = images(1)
    ex = Explainer(model, "features.3")
    res = ex.explain(
        x,
        methods=["gradcampp"],
        targets=1,
        options={"gradcampp": {"normalize_alpha": True, "stats": True}},
    )
    c = int(res.target_ids[0, 0])
    a, g, _ = ref_grad(model, "features.3", x, lambda o: o[0, c])
    a, g = a[0], g[0]
    ref = torch.zeros(a.shape[1:], dtype=torch.float64)
    alphas = []
    for k in range(a.shape[0]):
        den = 2 * g[k] ** 2 + a[k].sum() * g[k] ** 3
        alpha = torch.where(g[k] != 0, g[k] ** 2 / torch.where(den != 0, den, 1.0), 0.0)
        alphas.append(alpha[g[k] != 0])
        const = alpha[g[k] > 0].sum()
        alpha = alpha / (const if const != 0 else 1.0)  # the official code's normalisation
        ref += (alpha * g[k].clamp(min=0)).sum() * a[k]
    close(res.map("gradcampp")[0, 0], ref.clamp(min=0))
    st = res.stats["gradcampp"]
    flat = torch.cat(alphas)
    assert st["alpha_count"] == flat.numel()
    assert abs(st["alpha_min"] - float(flat.min())) < 1e-6
    assert abs(st["alpha_max"] - float(flat.max())) < 1e-6
    assert abs(st["alpha_mean"] - float(flat.mean())) < 1e-6
    assert res.stats["gradcampp@features.3"] == st
    # The statistics are computed only when asked for; the maps do not change.
    plain = ex.explain(
        x, methods=["gradcampp"], targets=1, options={"gradcampp": {"normalize_alpha": True}}
    )
    assert plain.stats == {}
    assert torch.equal(plain.map("gradcampp"), res.map("gradcampp"))


def test_cam_is_the_head_weights_times_activations() -> None:
    model = gap_net().double()
    x = images()
    res = Explainer(model, "features").explain(x, methods=["cam"], targets=[[0, 4], [2, 2]])
    a = model.features(x)
    for i in range(2):
        for j, c in enumerate([[0, 4], [2, 2]][i]):
            ref = sum(model.fc.weight[c, k] * a[i, k] for k in range(a.shape[1]))
            close(res.map("cam")[i, j], ref.clamp(min=0))


@pytest.mark.parametrize("mode", ["guided", "deconv"])
def test_modified_relu_backward_variants(mode: str) -> None:
    model = vgg_net().double()
    x = images()
    method = "gradcam_guidedrelu" if mode == "guided" else "gradcam_deconvrelu"
    res = Explainer(model, "features.3").explain(x, methods=[method, "gradcam"], targets=2)
    ref_model = guided_copy(model, mode)
    for i in range(2):
        for j in range(2):
            c = int(res.target_ids[i, j])
            a, g, _ = ref_grad(ref_model, "features.3", x[i : i + 1], lambda o, c=c: o[0, c])
            close(res.map(method)[i, j], ref_map("gradcam", a[0], g[0]))
            _, g0, _ = ref_grad(model, "features.3", x[i : i + 1], lambda o, c=c: o[0, c])
            close(res.map("gradcam")[i, j], ref_map("gradcam", a[0], g0[0]))
    assert not torch.allclose(res.map(method), res.map("gradcam"))


@pytest.mark.parametrize(("make", "layer"), [(vgg_net, "features.3"), (ResNetish, "block2.conv1")])
def test_guided_backprop_and_guided_x(make, layer) -> None:
    model = make().double()
    x = images()
    res = Explainer(model, layer).explain(
        x, methods=["guided_backprop", "guided_gradcam", "guided_xgradcam"], targets=2
    )
    gmodel = guided_copy(model, "guided")
    for i in range(2):
        for j in range(2):
            c = int(res.target_ids[i, j])
            xi = x[i : i + 1].clone().requires_grad_()
            (gx,) = torch.autograd.grad(gmodel(xi)[0, c], xi)
            gb = gx[0].abs().amax(dim=0)
            close(res.map("guided_backprop")[i, j], gb)
            a, g, _ = ref_grad(model, layer, x[i : i + 1], lambda o, c=c: o[0, c])
            for m in ("gradcam", "xgradcam"):
                up = upsample(normalize(ref_map(m, a[0], g[0])[None]), (16, 16))[0]
                close(res.map(f"guided_{m}")[i, j], gb * up)
    assert res.map("guided_backprop").shape == (2, 2, 16, 16)
    assert set(res.maps["input"]) == {"guided_backprop", "guided_gradcam", "guided_xgradcam"}


def test_one_pass_equals_separate_runs() -> None:
    model = vgg_net()
    x = images().float()
    methods = [
        *GRADIENT,
        "gradcam_guidedrelu",
        "gradcam_deconvrelu",
        "guided_backprop",
        "guided_gradcam",
    ]
    ex = Explainer(model, ["features.3", "features.0"])
    together = ex.explain(x, methods=methods, targets=3)
    for m in methods:
        for j in range(3):
            alone = ex.explain(x, methods=[m], targets=together.target_ids[:, j : j + 1])
            found = [layer for layer, maps in alone.maps.items() if m in maps]
            assert found
            for layer in found:
                close(together.maps[layer][m][:, j : j + 1], alone.maps[layer][m])


def test_several_layers_in_one_call_match_single_layer_calls() -> None:
    model = ResNetish()
    x = images().float()
    layers = ["block1.conv1", "block1", "block2"]
    both = Explainer(model, layers).explain(x, methods=["gradcam", "layercam"], targets=2)
    for layer in layers:
        one = Explainer(model, layer).explain(x, methods=["gradcam", "layercam"], targets=2)
        assert one.map("gradcam").shape[-2:] == both.map("gradcam", layer).shape[-2:]
        for m in ("gradcam", "layercam"):
            close(both.map(m, layer), one.map(m))


def test_functional_relu_model_reference_at_skip_connection() -> None:
    model = ResNetish().double()
    x = images()
    res = Explainer(model, "block1").explain(x, methods=["gradcam"], targets=1)
    c = int(res.target_ids[0, 0])
    a, g, _ = ref_grad(model, "block1", x[:1], lambda o: o[0, c])
    close(res.map("gradcam")[0, 0], F.relu((g[0].mean(dim=(1, 2))[:, None, None] * a[0]).sum(0)))


def test_channel_weights_give_the_maps_of_their_methods() -> None:
    from camserve.engine.methods import gradient
    from camserve.engine.methods._base import combine

    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64).relu()
    grads = torch.randn(2, 3, 5, 4, 4, generator=gen, dtype=torch.float64)
    assert set(gradient.CHANNEL_WEIGHTS) <= set(GRADIENT)
    for m, (weights, relu) in gradient.CHANNEL_WEIGHTS.items():
        w = weights(acts, grads)
        assert w.shape == (2, 3, 5), m
        close(combine(acts, w, relu=relu), getattr(gradient, m)(acts, grads))
    assert not gradient.CHANNEL_WEIGHTS["gradcam_norelu"][1]

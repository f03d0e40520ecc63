"""Re-running methods through explain(): options, batch size, extra inputs, several layers."""

from __future__ import annotations

import torch
from torch import Tensor

from camserve.engine import Explainer
from camserve.engine.methods import perturbation, reference
from tests.engine._nets import ResNetish, Vqa, vgg_net


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()))), float(
        (a - b).abs().max()
    )


def _images(n: int = 2) -> Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_scorecam_and_occlusion_use_the_models_scores() -> None:
    model = vgg_net().double()
    x = _images()
    ex = Explainer(model, "features.3", batch_size=5)
    res = ex.explain(
        x,
        methods=["scorecam", "occlusion"],
        targets=2,
        score="probability",
        options={"occlusion": {"mask": 6, "stride": 4, "fill": 0.5}},
    )
    ids = res.target_ids
    calls: list[int] = []

    def score(i: int, v: Tensor) -> Tensor:  # by hand, no engine code
        calls.append(v.shape[0])
        with torch.no_grad():
            return torch.softmax(model(v), 1)[:, ids[i]]

    with torch.no_grad():
        acts = model.features[:4](x)
    close(res.map("scorecam"), perturbation.score_cam(x, acts, score, batch_size=5))
    assert max(calls) <= 5
    base = torch.softmax(model(x), 1).gather(1, ids)
    occ = perturbation.occlusion(x, base, score, mask=6, stride=4, fill=0.5)
    close(res.map("occlusion"), occ)
    assert res.map("occlusion").shape == (2, 2, 16, 16)
    assert {"method.scorecam", "method.occlusion"} <= set(res.timings)


def test_integrated_gradients_complete_through_the_engine() -> None:
    """sum IG_c = F_c(x) - F_c(0) (completeness) when the engine supplies the gradients."""
    model = ResNetish().double()
    x = _images()
    res = Explainer(model, "block2").explain(
        x,
        methods=["integrated_gradients", "gradient_shap"],
        targets=2,
        options={"integrated_gradients": {"steps": 64}, "gradient_shap": {"samples": 4, "seed": 1}},
    )
    with torch.no_grad():
        zero = model(torch.zeros_like(x)).gather(1, res.target_ids)
    total = res.map("integrated_gradients").double().sum(dim=(-2, -1))
    assert torch.allclose(
        total, res.target_scores.double() - zero, atol=2e-3 * float(zero.abs().max() + 1)
    )
    assert res.map("gradient_shap").shape == (2, 2, 16, 16)
    ids = res.target_ids

    def input_grad(i: int, v: Tensor) -> tuple[Tensor, Tensor]:
        v = v.detach().requires_grad_()
        out = model(v)[:, ids[i]]
        grads = torch.stack(
            [
                torch.autograd.grad(out[:, j].sum(), v, retain_graph=True)[0]
                for j in range(out.shape[1])
            ],
            1,
        )
        return out.detach(), grads

    close(res.map("gradient_shap"), reference.gradient_shap(x, input_grad, samples=4, seed=1))


def test_rerun_methods_with_an_extra_input_and_a_score_function() -> None:
    model = Vqa().double()
    x = _images()
    q = torch.tensor([[1, 2, 3], [4, 5, 6]])
    answers = torch.tensor([1, 3])

    def answer(out: Tensor, rows: Tensor) -> Tensor:
        return out[torch.arange(len(rows)), answers[rows]][:, None]

    res = Explainer(model, "features", batch_size=4).explain(
        (x, q),
        methods=["ablationcam", "scorecam", "occlusion", "gradcam"],
        targets=answer,
        options={"occlusion": {"mask": 8, "stride": 8}},
    )
    with torch.no_grad():
        acts = model.features(x)
        qv = torch.tanh(model.embed(q).mean(dim=1))
        s = model.out(acts.mean(dim=(2, 3)) * qv)[torch.arange(2), answers]
    close(res.target_scores[:, 0], s)
    for i in range(2):  # Ablation-CAM by hand: zero each channel, score again
        ref = torch.zeros(8, 8, dtype=torch.float64)
        for k in range(8):
            ab = acts[i : i + 1].clone()
            ab[0, k] = 0
            with torch.no_grad():
                sk = model.out(ab.mean(dim=(2, 3)) * qv[i : i + 1])[0, answers[i]]
            ref += (s[i] - sk) / s[i] * acts[i, k]
        close(res.map("ablationcam")[i, 0], ref.clamp(min=0))
    for m in ("scorecam", "occlusion"):
        assert bool(torch.isfinite(res.map(m)).all()) and float(res.map(m).abs().max()) > 0


def test_ablationcam_on_nested_and_several_layers() -> None:
    """An inner layer (not an fx leaf) falls back to a full re-run; results agree either way."""
    model = ResNetish().double()
    x = _images(1)
    layers = ["block1", "block1.conv1", "block2"]
    ex = Explainer(model, layers, batch_size=3)
    assert ex._split is not None and set(ex._split.cuts) == {"block1", "block2"}
    res = ex.explain(x, methods=["ablationcam", "gradcam"], targets=2)
    for layer in layers:
        one = Explainer(model, layer, trace=False).explain(
            x, methods=["ablationcam"], targets=res.target_ids
        )
        close(res.map("ablationcam", layer), one.map("ablationcam"))

"""000 sec. 3 (CAM = Grad-CAM = XGrad-CAM = Ablation-CAM on GAP nets); conservation (000 sec. 1)."""

from __future__ import annotations

import torch
from torch import nn

from camserve.engine import Explainer
from tests.engine._nets import gap_net


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def test_gap_network_methods_coincide_after_normalisation() -> None:
    model = gap_net()
    res = Explainer(model, "features").explain(
        _images(),
        methods=["cam", "gradcam", "xgradcam", "hirescam", "ablationcam"],
        targets=3,
        options={"ablationcam": {"form": "sum"}},
    )
    ref = res.normalized("cam")
    assert float(ref.max()) > 0.5  # the maps are not trivially zero
    for m in ("gradcam", "xgradcam", "hirescam", "ablationcam"):
        assert torch.allclose(res.normalized(m), ref, atol=1e-5), m


def test_gap_network_methods_coincide_without_ablation() -> None:
    res = Explainer(gap_net(), "features").explain(
        _images(), methods=["cam", "gradcam", "xgradcam"], targets=5
    )
    for m in ("gradcam", "xgradcam"):
        assert torch.allclose(res.normalized(m), res.normalized("cam"), atol=1e-5), m


def _bias_free_positive_head() -> nn.Sequential:
    """Bias-free ReLU network; non-negative weights after the layer keep every map >= 0."""
    torch.manual_seed(7)
    head_conv = nn.Conv2d(6, 4, 3, padding=1, bias=False)
    fc = nn.Linear(4 * 4 * 4, 3, bias=False)
    with torch.no_grad():
        head_conv.weight.abs_()
        fc.weight.abs_()
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            head_conv,
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            fc,
        )
        .eval()
        .double()
    )


def test_conservation_identity_on_a_bias_free_relu_network() -> None:
    """S^c = sum_k sum_xy (dS^c/dF_k) F_k when eps(F) = 0 (000 sec. 1, 004 axiom 1)."""
    model = _bias_free_positive_head()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = Explainer(model, "2").explain(x, methods=["xgradcam", "hirescam", "gradcam"], targets=3)
    s = res.target_scores.double()
    assert float(s.abs().min()) > 1e-3
    for m in ("xgradcam", "hirescam"):  # both sum to the class score exactly
        total = res.map(m, "2").double().sum(dim=(-2, -1))
        assert torch.allclose(total, s, rtol=1e-5, atol=1e-6), (m, total, s)
    # Grad-CAM does not conserve the score in general (the point of 004).
    gradcam_total = res.map("gradcam", "2").double().sum(dim=(-2, -1))
    assert float(((gradcam_total - s).abs() / s.abs()).max()) > 1e-3

"""Map helpers and Explanation accessors."""

from __future__ import annotations

import pytest
import torch

from camserve.engine import Explainer
from camserve.engine.maps import normalize, upsample
from camserve.errors import InvalidRequestError, UnknownNameError
from tests.engine._nets import vgg_net


def test_normalize_and_upsample() -> None:
    m = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])
    n = normalize(m)
    assert torch.allclose(n, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    up = upsample(n, (4, 4))
    ref = torch.nn.functional.interpolate(
        n[None], size=(4, 4), mode="bilinear", align_corners=False
    )[0]
    assert torch.allclose(up, ref)
    with pytest.raises(InvalidRequestError):
        upsample(n, (0, 4))

def test_explanation_accessors() -> None:
    res = Explainer(vgg_net(), "features.3").explain(
        torch.randn(2, 3, 16, 16), methods=["gradcam", "guided_backprop"], targets=2
    )
    assert res.map("gradcam") is res.maps["features.3"]["gradcam"]
    assert res.map("guided_backprop") is res.maps["input"]["guided_backprop"]
    assert res.upsampled("gradcam").shape == (2, 2, 16, 16)
    assert res.upsampled("gradcam", size=(5, 7)).shape == (2, 2, 5, 7)
    n = res.normalized("gradcam")
    assert float(n.min()) >= 0.0 and float(n.max()) <= 1.0
    assert {
        "forward",
        "backward",
        "method.gradcam",
        "method.guided_backprop",
        "upsample",
        "total",
    } <= set(res.timings)
    assert all(v >= 0.0 for v in res.timings.values())
    assert res.timings["total"] >= res.timings["forward"]
    with pytest.raises(UnknownNameError, match="gradcampp"):
        res.map("gradcampp")
    with pytest.raises(UnknownNameError, match="layer"):
        res.map("gradcam", "features.0")

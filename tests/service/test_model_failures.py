"""A model whose output is NaN for some inputs only: those requests fail, the others answer.

The model is NaN for images whose red channel is bright (a per-row property),
so in a shared engine call the engine names the rows at fault; those requests
get a ModelFailureError naming the served model, and the rest of the group is
answered with the maps a direct engine call gives for each image alone.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.errors import ModelFailureError
from camserve.service import ExplainError, ExplainRequest, ExplainResult, ExplainService
from camserve.service.images import decode_image

from .conftest import LABELS, SETTINGS, TRANSFORM, JsonRunner, TinyGAP, json_item, tiny_task

MESSAGE = "model 'tiny': the model's output is not finite (NaN or inf)"


class NaNForBrightRed(TinyGAP):
    """TinyGAP whose logits are NaN for inputs with a bright red channel (row by row)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        bad = x[:, 0].mean(dim=(1, 2)) > 1.0  # normalised red > 1: pixel red > 191
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


def picture(red: int, seed: int) -> bytes:
    """A 20 x 24 PNG: noisy green and blue, a constant red channel."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    arr[..., 0] = red
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return NaNForBrightRed().eval()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every engine call."""
    seen: list[int] = []
    real = Explainer.explain

    def explain(self: Explainer, inputs: Any, **kw: Any) -> Any:
        seen.append(int(inputs.shape[0]))
        return real(self, inputs, **kw)

    monkeypatch.setattr(Explainer, "explain", explain)
    return seen


# good, bad, good, bad, good
IMAGES = [picture(red, seed) for seed, red in enumerate((10, 250, 60, 230, 120))]
BAD = {1, 3}


@pytest.mark.parametrize("methods", [("gradcam", "layercam"), ("ablationcam",)])
def test_only_the_images_the_model_fails_on_get_a_model_failure(
    model: nn.Module, calls: list[int], methods: tuple[str, ...]
) -> None:
    svc = ExplainService({"tiny": tiny_task(model)}, settings=SETTINGS)
    outs = svc.run(
        [
            ExplainRequest(model="tiny", image=im, methods=methods, top_k=2, request_id=str(i))
            for i, im in enumerate(IMAGES)
        ]
    )
    assert calls == [5, 3]  # the group, then the rest of it (not one call per request)
    for i, (image, out) in enumerate(zip(IMAGES, outs, strict=True)):
        assert out.request_id == str(i)
        if i in BAD:
            assert isinstance(out, ExplainError) and isinstance(out.error, ModelFailureError)
            assert str(out.error) == MESSAGE and out.error.model == "tiny"
            continue
        assert isinstance(out, ExplainResult), out
        x = TRANSFORM(decode_image(image))[None]
        with torch.enable_grad():
            direct = Explainer(model, "features.3").explain(x, methods=methods, targets=2)
        assert [t.id for t in out.targets] == direct.target_ids[0].tolist()
        for j, t in enumerate(out.targets):
            for m in methods:
                got = t.maps[m].data
                assert got is not None and float(got.max()) > 0
                np.testing.assert_allclose(got, direct.upsampled(m)[0, j].numpy(), atol=1e-5)
        assert [p.label for p in out.predictions][:1] == [
            LABELS[int(direct.probabilities[0].argmax())]
        ]


def test_a_group_of_only_failing_images_is_rechecked_one_by_one(
    model: nn.Module, calls: list[int]
) -> None:
    svc = ExplainService({"tiny": tiny_task(model)}, settings=SETTINGS)
    outs = svc.run([ExplainRequest(model="tiny", image=IMAGES[i]) for i in sorted(BAD)])
    assert calls == [2, 1, 1]  # every row named: each alone, as a non-batch-first NaN would be
    for out in outs:
        assert isinstance(out, ExplainError) and str(out.error) == MESSAGE


def test_predictions_only_fail_per_image_too(model: nn.Module) -> None:
    svc = ExplainService({"tiny": tiny_task(model)}, settings=SETTINGS)
    outs = svc.run([ExplainRequest(model="tiny", image=im, predict_only=True) for im in IMAGES])
    for i, out in enumerate(outs):
        if i in BAD:
            assert isinstance(out, ExplainError) and str(out.error) == MESSAGE
        else:
            assert isinstance(out, ExplainResult) and out.predictions, out
            assert all(np.isfinite(p.probability) for p in out.predictions)


def test_the_json_path_answers_500_for_the_failed_images_only(model: nn.Module) -> None:
    answers = JsonRunner(tiny_task(model)).run(
        [json_item(im, methods=["gradcam"]) for im in IMAGES]
    )
    assert [a.status for a in answers] == [200, 500, 200, 500, 200]
    for i in BAD:
        err = json.loads(answers[i].body)["error"]
        assert err["type"] == "ModelFailureError" and err["message"] == MESSAGE

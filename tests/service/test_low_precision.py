"""Low-precision models in the service: bfloat16 and float16 models get their own dtype.

The service decodes images to float32 inputs; a model whose parameters are
bfloat16 or float16 gets them cast to its dtype (a server-side setting, never
the caller's fault), and every map, score and probability comes back float32.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from camserve.engine import Explainer
from camserve.models.spec import ModelSpec
from camserve.service import ExplainRequest, ExplainResult, ExplainService
from camserve.service.images import decode_image
from camserve.service.tasks import input_dtype
from camserve.service.text_tasks import CaptionTask, VQATask

from .conftest import SETTINGS, TRANSFORM, JsonRunner, TinyGAP, json_item, png, tiny_task
from .test_text_tasks import ANSWERS, VOCAB, TinyCaptioner, TinyVQA, tokenize

LOW = [torch.bfloat16, torch.float16]
# Normalised maps of a low-precision copy stay this close to the float32 model's.
TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.01}


def low_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(model).to(dtype)


def run(model: nn.Module, *requests: ExplainRequest) -> list[ExplainResult]:
    outcomes = ExplainService({"tiny": tiny_task(model)}, settings=SETTINGS).run(list(requests))
    for outcome in outcomes:
        assert isinstance(outcome, ExplainResult), outcome
    return [o for o in outcomes if isinstance(o, ExplainResult)]


def test_input_dtype_is_the_models_floating_dtype() -> None:
    assert input_dtype(TinyGAP()) == torch.float32
    assert input_dtype(TinyGAP().to(torch.bfloat16)) == torch.bfloat16
    assert input_dtype(TinyGAP().to(torch.float16)) == torch.float16
    assert input_dtype(nn.Identity()) == torch.float32
    # Integer buffers (an embedding's ids, BatchNorm's counter) do not count.
    bn = nn.Sequential(nn.BatchNorm2d(3)).to(torch.float16)
    assert input_dtype(bn) == torch.float16


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_classifier_explains_with_float32_maps(
    gap_model: nn.Module, dtype: torch.dtype
) -> None:
    low = low_copy(gap_model, dtype)
    image = png(3)
    methods = ("gradcam", "gradcampp", "layercam")
    [res] = run(low, ExplainRequest(model="tiny", image=image, methods=methods, top_k=2))
    [ref] = run(gap_model, ExplainRequest(model="tiny", image=image, methods=methods, top_k=2))
    # Exactly the engine on the model with the decoded input cast to its dtype.
    x = TRANSFORM(decode_image(image))[None].to(dtype)
    exp = Explainer(low, "features.3").explain(x, methods=methods, targets=2)
    assert [t.id for t in res.targets] == exp.target_ids[0].tolist()
    for p in res.predictions:
        assert isinstance(p.probability, float) and np.isfinite(p.probability)
    for j, (target, ref_target) in enumerate(zip(res.targets, ref.targets, strict=True)):
        for m in methods:
            data = target.maps[m].data
            assert data is not None and data.dtype == np.float32
            np.testing.assert_allclose(data, exp.upsampled(m)[0, j].numpy(), atol=1e-6)
            if target.id == ref_target.id:
                ref_data = ref_target.maps[m].data
                assert ref_data is not None
                np.testing.assert_allclose(data, ref_data, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_over_the_json_path_is_not_the_callers_fault(
    gap_model: nn.Module, dtype: torch.dtype
) -> None:
    [answer] = JsonRunner(tiny_task(low_copy(gap_model, dtype))).run(
        [json_item(png(4), methods=["gradcam"], output="raw")]
    )
    assert answer.ok, answer
    body = json.loads(answer.body)
    assert body["explanations"][0]["maps"]["gradcam"]["dtype"] == "float32"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_predict_only_and_tensor_input(
    gap_model: nn.Module, dtype: torch.dtype
) -> None:
    low = low_copy(gap_model, dtype)
    x = TRANSFORM(decode_image(png(6))).numpy()  # float32, as a caller has it
    only, tensor = run(
        low,
        ExplainRequest(model="tiny", image=png(6), predict_only=True, top_k=2),
        ExplainRequest(model="tiny", tensor=x, top_k=2),
    )
    assert not only.targets and len(only.predictions) == 3
    with torch.no_grad():
        probs = low(torch.from_numpy(x)[None].to(dtype)).float().softmax(dim=1)[0]
    assert [p.id for p in only.predictions] == torch.argsort(probs, descending=True).tolist()
    np.testing.assert_allclose(
        [p.probability for p in only.predictions], probs.sort(descending=True).values, atol=1e-6
    )
    assert tensor.targets[0].maps["gradcam"].data is not None
    assert tensor.targets[0].maps["gradcam"].data.dtype == np.float32


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_captioner_and_vqa(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    cap = TinyCaptioner().eval().to(dtype)
    torch.manual_seed(3)
    vqa = TinyVQA().eval().to(dtype)
    service = ExplainService(
        {
            "cap": CaptionTask("cap", cap, cap.generate, VOCAB, 1, "enc.1", TRANSFORM),
            "vqa": VQATask("vqa", vqa, ANSWERS, tokenize, "cnn.1", TRANSFORM),
        },
        settings=SETTINGS,
    )
    caption, answer = service.run(
        [
            ExplainRequest(model="cap", image=png(1)),
            ExplainRequest(model="vqa", image=png(2), question="what colour is the circle"),
        ]
    )
    for res in (caption, answer):
        assert isinstance(res, ExplainResult), res
        assert res.targets
        for target in res.targets:
            assert np.isfinite(target.score)
            data = target.maps["gradcam"].data
            assert data is not None and data.dtype == np.float32 and np.isfinite(data).all()


LOW_NET = """
import torch
from torch import nn


def make(dtype: str = "bfloat16") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )
    return net.to(getattr(torch, dtype))
"""


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_a_users_low_precision_model_from_a_spec(
    dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lowprecnets.py").write_text(LOW_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("lowprecnets", None)
    name = str(dtype).removeprefix("torch.")
    # float32 weights, as training saved them: cast as they load into the model.
    import lowprecnets  # type: ignore[import-not-found]

    torch.save(lowprecnets.make("float32").state_dict(), tmp_path / "net.pt")
    spec = ModelSpec(
        name="low",
        kind="classifier",
        layer="0",
        input_size=(3, 16, 16),
        labels=("a", "b", "c"),
        factory="lowprecnets:make",
        factory_kwargs={"dtype": name},
        weights=tmp_path / "net.pt",
    )
    try:
        service = ExplainService.from_specs([spec], device="cpu", settings=SETTINGS)
        [out] = service.run([ExplainRequest(model="low", image=png(7), top_k=3)])
    finally:
        sys.modules.pop("lowprecnets", None)
    assert isinstance(out, ExplainResult), out
    assert [t.label for t in out.targets] == [p.label for p in out.predictions][:3]
    data = out.targets[0].maps["gradcam"].data
    assert data is not None and data.dtype == np.float32 and np.isfinite(data).all()

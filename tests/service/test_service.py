"""ExplainService on typed requests and results: no JSON anywhere."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from camserve.engine import Explainer
from camserve.errors import (
    DeadlineExceededError,
    ImageTooLargeError,
    ModelFailureError,
    UnknownNameError,
    UnsupportedMethodError,
)
from camserve.render import localization_box, scale_box
from camserve.service import ExplainError, ExplainRequest, ExplainResult, ExplainService
from camserve.service.images import decode_image

from .conftest import LABELS, SETTINGS, TRANSFORM, RecordingSink, TinyGAP, png, tiny_task


def service(model: nn.Module, sink: RecordingSink | None = None) -> ExplainService:
    return ExplainService({"tiny": tiny_task(model)}, settings=SETTINGS, metrics=sink)


def request(image: bytes, **kw: Any) -> ExplainRequest:
    return ExplainRequest(model="tiny", image=image, **kw)


def result(outcome: Any) -> ExplainResult:
    assert isinstance(outcome, ExplainResult), outcome
    return outcome


def engine_direct(model: nn.Module, image: bytes, **kw: Any) -> Any:
    x = TRANSFORM(decode_image(image))[None]
    with torch.enable_grad():
        return Explainer(model, "features.3").explain(x, **kw)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[str, ...]]]:
    """Records (batch size, methods) of every engine call."""
    calls: list[tuple[int, tuple[str, ...]]] = []
    real = Explainer.explain

    def explain(self: Explainer, inputs: Any, **kw: Any) -> Any:
        calls.append((int(inputs.shape[0]), tuple(kw["methods"])))
        return real(self, inputs, **kw)

    monkeypatch.setattr(Explainer, "explain", explain)
    return calls


def test_typed_result_matches_the_engine(gap_model: nn.Module) -> None:
    image = png(3)
    [out] = service(gap_model).run(
        [request(image, methods=("gradcam", "gradcampp"), top_k=2, request_id="r1")]
    )
    res = result(out)
    exp = engine_direct(gap_model, image, methods=("gradcam", "gradcampp"), targets=2)
    assert (res.request_id, res.model, res.kind, res.layer) == (
        "r1",
        "tiny",
        "classifier",
        "features.3",
    )
    assert res.image_size == (24, 20) and res.input_size == (16, 16)
    assert [p.id for p in res.predictions] == torch.argsort(
        exp.probabilities[0], descending=True
    ).tolist()
    assert res.predictions[0].label == LABELS[res.predictions[0].id]
    assert [t.id for t in res.targets] == exp.target_ids[0].tolist()
    for j, t in enumerate(res.targets):
        assert t.kind == "class" and t.score == pytest.approx(float(exp.target_scores[0, j]))
        for m in ("gradcam", "gradcampp"):
            got = t.maps[m]
            assert got.layer == "features.3" and got.data is not None and got.png is None
            np.testing.assert_allclose(got.data, exp.upsampled(m)[0, j].numpy(), atol=1e-6)
            want_box = scale_box(localization_box(got.data, 0.15), (16, 16), (24, 20))
            assert got.box == want_box
    assert {"decode", "forward", "backward", "encode"} <= set(res.timings)
    assert res.batch_size == 1


def test_raw_png_and_box_outputs(gap_model: nn.Module) -> None:
    image = png(4)
    raw, pic, box, nobox = service(gap_model).run(
        [
            request(image, output="raw", class_ids=(2,)),
            request(image, output="png"),
            request(image, output="box", boxes=False),
            request(image, boxes=False),
        ]
    )
    exp = engine_direct(gap_model, image, methods=("gradcam",), targets=[[2]])
    m = result(raw).targets[0].maps["gradcam"]
    assert m.data is not None and m.data.shape == tuple(exp.map("gradcam").shape[-2:])
    np.testing.assert_allclose(m.data, exp.map("gradcam")[0, 0].numpy(), atol=1e-6)
    p = result(pic).targets[0].maps["gradcam"]
    assert p.png is not None and p.png.startswith(b"\x89PNG") and p.data is None
    b = result(box).targets[0].maps["gradcam"]
    assert b.box is not None and b.data is None and b.png is None  # box output: always a box
    n = result(nobox).targets[0].maps["gradcam"]
    assert n.box is None and n.data is not None  # not asked for, not computed


def test_boxes_of_a_shared_engine_call_equal_those_of_separate_calls(gap_model: nn.Module) -> None:
    """Boxes are labelled in one pass per method for the whole group: same as one by one."""
    reqs = [
        request(png(i), methods=("gradcam", "layercam"), top_k=3, threshold=t, output=o)
        for i, (t, o) in enumerate([(0.15, "normalized"), (0.5, "box"), (0.9, "raw"), (1.0, "png")])
    ]
    together = [result(o) for o in service(gap_model).run(reqs)]
    for req, both in zip(reqs, together, strict=True):
        alone = result(service(gap_model).run([req])[0])
        for a, b in zip(alone.targets, both.targets, strict=True):
            for m in ("gradcam", "layercam"):
                assert b.maps[m].box is not None and b.maps[m].box == a.maps[m].box


def test_tensor_input_skips_decoding_and_gives_the_same_maps(gap_model: nn.Module) -> None:
    image = png(5)
    x = TRANSFORM(decode_image(image)).numpy()
    from_image, from_tensor = service(gap_model).run(
        [request(image, top_k=2), ExplainRequest(model="tiny", tensor=x, top_k=2)]
    )
    a, b = result(from_image), result(from_tensor)
    assert b.image_size == (16, 16)
    for ta, tb in zip(a.targets, b.targets, strict=True):
        assert ta.id == tb.id
        np.testing.assert_allclose(ta.maps["gradcam"].data, tb.maps["gradcam"].data, atol=1e-6)
    [wrong] = service(gap_model).run(
        [ExplainRequest(model="tiny", tensor=np.zeros((3, 8, 8), np.float32))]
    )
    assert isinstance(wrong, ExplainError) and "shape (3, 16, 16)" in str(wrong.error)
    [png_of_tensor] = service(gap_model).run([ExplainRequest(model="tiny", tensor=x, output="png")])
    assert isinstance(png_of_tensor, ExplainError)
    assert "output 'png' overlays an image" in str(png_of_tensor.error)


def test_predict_only_gives_predictions_without_an_engine_call(
    gap_model: nn.Module, spy: list[tuple[int, tuple[str, ...]]]
) -> None:
    image = png(6)
    [out] = service(gap_model).run([request(image, predict_only=True)])
    res = result(out)
    assert spy == [] and res.targets == ()
    with torch.no_grad():
        probs = torch.softmax(gap_model(TRANSFORM(decode_image(image))[None]), dim=-1)[0]
    assert [p.id for p in res.predictions] == torch.argsort(probs, descending=True).tolist()
    assert res.predictions[0].probability == pytest.approx(float(probs.max()), abs=1e-6)


def test_rerun_methods_never_share_a_call_with_cheap_requests(
    gap_model: nn.Module, spy: list[tuple[int, tuple[str, ...]]]
) -> None:
    outs = service(gap_model).run(
        [
            request(png(1), methods=("gradcam",)),
            request(png(2), methods=("guided_scorecam",)),
            request(png(3), methods=("gradcam", "layercam")),
            request(png(4), methods=("guided_ablationcam",)),
            request(png(5), methods=("guided_scorecam",)),
        ]
    )
    assert all(isinstance(o, ExplainResult) for o in outs)
    assert sorted(spy) == sorted(
        [(2, ("gradcam", "layercam")), (2, ("guided_scorecam",)), (1, ("guided_ablationcam",))]
    )
    assert list(result(outs[0]).targets[0].maps) == ["gradcam"]


def test_per_request_errors_leave_the_others_alone(fc_model: nn.Module) -> None:
    big = np.zeros((300, 300, 3), np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    outs = service(fc_model).run(
        [
            request(png(1)),
            request(png(2), methods=("cam",)),
            ExplainRequest(model="nosuch", image=png(3)),
            request(buf.getvalue()),
            request(png(4), labels=("purple",)),
            request(png(5), layer="features.9"),
        ]
    )
    assert isinstance(outs[0], ExplainResult)
    errors = [o.error for o in outs[1:] if isinstance(o, ExplainError)]
    assert [type(e) for e in errors] == [
        UnsupportedMethodError,
        UnknownNameError,
        ImageTooLargeError,
        UnknownNameError,
        UnknownNameError,
    ]
    assert str(errors[1]) == "unknown model 'nosuch'; valid models: tiny"
    assert str(errors[3]).startswith("unknown label 'purple'")


def test_a_request_past_its_deadline_is_not_computed(
    gap_model: nn.Module, spy: list[tuple[int, tuple[str, ...]]]
) -> None:
    now = time.monotonic()
    late, ok = service(gap_model).run(
        [request(png(1), deadline=now - 1.0), request(png(2), deadline=now + 60.0)]
    )
    assert isinstance(late, ExplainError) and isinstance(late.error, DeadlineExceededError)
    assert isinstance(ok, ExplainResult)
    assert spy == [(1, ("gradcam",))]


class Broken(TinyGAP):
    """Fails on a valid input, as a model with a bug would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch inside the model")


def test_a_failing_model_gives_a_model_failure_naming_it() -> None:
    svc = ExplainService({"tiny": tiny_task(Broken().eval())}, settings=SETTINGS)
    outs = svc.run([request(png(1)), request(png(2))])
    for o in outs:
        assert isinstance(o, ExplainError) and isinstance(o.error, ModelFailureError)
        assert "model 'tiny'" in str(o.error) and "shape mismatch" in str(o.error)


class NaNOutput(TinyGAP):
    """Answers NaN logits: the maps would be blank if nobody looked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


@pytest.mark.parametrize(
    "kw", [{}, {"predict_only": True}, {"methods": ("scorecam",)}, {"methods": ("guided_gradcam",)}]
)
def test_non_finite_model_output_is_a_model_failure_not_a_blank_map(kw: dict[str, Any]) -> None:
    svc = ExplainService({"tiny": tiny_task(NaNOutput().eval())}, settings=SETTINGS)
    [out] = svc.run([request(png(1), **kw)])
    assert isinstance(out, ExplainError) and isinstance(out.error, ModelFailureError)
    assert str(out.error) == "model 'tiny': the model's output is not finite (NaN or inf)"


def test_metrics_latency_is_per_request(gap_model: nn.Module) -> None:
    sink = RecordingSink()
    service(gap_model, sink).run([request(png(1)), request(b"nope")])
    lat = [
        (lab["status"], v) for n, v, lab in sink.records if n == "camserve_request_latency_seconds"
    ]
    assert [s for s, _ in lat] == ["ok", "InvalidImageError"]
    total = [v for n, v, lab in sink.records if lab.get("stage") == "total"]
    assert lat[1][1] < lat[0][1] <= total[0]  # the refused one took less than the batch
    assert all(lab.get("device", "cpu") == "cpu" for _, _, lab in sink.records)


def test_concurrent_runs_from_threads_give_the_sequential_answers(gap_model: nn.Module) -> None:
    svc = service(gap_model)
    reqs = [request(png(i), methods=("gradcam", "layercam"), top_k=2) for i in range(6)]
    want = [result(o) for o in svc.run(reqs)]
    got: dict[int, ExplainResult] = {}

    def work(i: int) -> None:
        got[i] = result(svc.run([reqs[i]])[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, w in enumerate(want):
        for tw, tg in zip(w.targets, got[i].targets, strict=True):
            np.testing.assert_allclose(
                tw.maps["layercam"].data, tg.maps["layercam"].data, atol=1e-5
            )


def test_describe(gap_model: nn.Module) -> None:
    svc = service(gap_model)
    assert svc.model_names() == ["tiny"]
    d = svc.describe("tiny")
    assert d.kind == "classifier" and d.labels == LABELS and d.layer == "features.3"
    assert "features.3" in d.layers and d.input_size == (3, 16, 16)
    assert d.mean == (0.5, 0.5, 0.5) and d.device == "cpu" and d.runtime == "torch"
    by_id = {m.id: m for m in d.methods}
    assert by_id["scorecam"].cost == "rerun" and by_id["gradcam"].cost == "single_pass"
    assert by_id["occlusion"].options["mask"] == ("int",)
    with pytest.raises(UnknownNameError, match="unknown model 'x'"):
        svc.describe("x")


def test_the_services_own_limits_apply(gap_model: nn.Module) -> None:
    strict = SETTINGS.model_copy(update={"max_methods": 1, "max_targets": 2})
    svc = ExplainService({"tiny": tiny_task(gap_model)}, settings=strict)
    many, wide, fine = svc.run(
        [
            request(png(1), methods=("gradcam", "layercam")),
            request(png(1), top_k=3),
            request(png(1), top_k=2),
        ]
    )
    assert isinstance(many, ExplainError) and "at most 1 methods per request, got 2" in str(
        many.error
    )
    assert isinstance(wide, ExplainError) and "at most 2 targets per request, got 3" in str(
        wide.error
    )
    assert isinstance(fine, ExplainResult)

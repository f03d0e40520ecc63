"""The gateway over the real in-process ExplainService: the zoo's classifier, captioner and VQA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from camserve.client import Client
from camserve.gateway.convert import response_of
from camserve.gateway.inprocess import InProcessBackend
from camserve.gateway.proto import pb
from camserve.gateway.server import BackgroundGateway
from camserve.service import ExplainRequest, ExplainResult
from tests.gateway.conftest import start, stub

STORE = Path(__file__).resolve().parents[2] / "model_store"
SCENE = (STORE / "examples" / "scene_1.png").read_bytes() if STORE.exists() else b""


@pytest.fixture(scope="module")
def zoo_backend() -> InProcessBackend:
    if not (STORE / "manifest.json").exists():
        pytest.fail("model_store/ is not built: run `camserve build-models`")
    return InProcessBackend.load(["resnet_gap", "captioner", "vqa"], STORE)


@pytest.fixture(scope="module")
def zoo(zoo_backend: InProcessBackend) -> Iterator[BackgroundGateway]:
    gw = start(zoo_backend, max_batch_delay_ms=5)
    try:
        yield gw
    finally:
        gw.stop()


def comparable(msg: pb.ExplainResponse) -> pb.ExplainResponse:
    out = pb.ExplainResponse()
    out.CopyFrom(msg)
    out.ClearField("timings")
    out.ClearField("batch_size")
    return out


def test_classifier_through_the_gateway_equals_the_service(
    zoo: BackgroundGateway, zoo_backend: InProcessBackend
) -> None:
    msg = pb.ExplainRequest(
        request_id="c",
        model="resnet_gap",
        image=SCENE,
        methods=["gradcam", "gradcampp"],
        top_k=2,
        output=pb.OUTPUT_NORMALIZED,
    )
    got = stub(zoo).Explain(msg, timeout=60)
    direct = zoo_backend.run(
        [
            ExplainRequest(
                "resnet_gap", image=SCENE, methods=("gradcam", "gradcampp"), top_k=2, request_id="c"
            )
        ]
    )[0]
    assert isinstance(direct, ExplainResult)
    assert comparable(got) == comparable(response_of(direct))
    assert got.kind == pb.MODEL_KIND_CLASSIFIER and len(got.targets) == 2
    assert got.targets[0].maps[0].HasField("box")


def test_captioning_through_the_gateway(zoo: BackgroundGateway) -> None:
    got = stub(zoo).Explain(
        pb.ExplainRequest(
            model="captioner", image=SCENE, methods=["gradcam"], output=pb.OUTPUT_BOX
        ),
        timeout=60,
    )
    assert got.kind == pb.MODEL_KIND_CAPTIONER
    assert got.caption and list(got.words) == got.caption.split()
    kinds = [t.kind for t in got.targets]
    assert kinds.count(pb.TARGET_KIND_WORD) == len(got.words)
    assert kinds.count(pb.TARGET_KIND_CAPTION) == 1
    words = [t for t in got.targets if t.kind == pb.TARGET_KIND_WORD]
    assert [t.label for t in words] == list(got.words)
    assert [t.position for t in words] == list(range(len(got.words)))
    assert all(t.maps[0].HasField("box") for t in got.targets)
    assert got.score == pb.SCORE_LOG_PROBABILITY


def test_vqa_through_the_gateway(zoo: BackgroundGateway) -> None:
    text = (STORE / "examples" / "scene_1.txt").read_text()
    question = "what colour is the triangle" if "triangle" in text else "what shape is it"
    got = stub(zoo).Explain(
        pb.ExplainRequest(
            model="vqa",
            image=SCENE,
            question=question,
            answers=["green"],
            methods=["gradcam", "layercam"],
            output=pb.OUTPUT_RAW,
        ),
        timeout=60,
    )
    assert got.kind == pb.MODEL_KIND_VQA and got.question == question and got.answer
    answers = [t for t in got.targets if t.kind == pb.TARGET_KIND_ANSWER]
    assert answers[0].label == got.answer and answers[-1].label == "green"
    for t in answers:
        assert [m.method for m in t.maps] == ["gradcam", "layercam"]
        arr = np.frombuffer(t.maps[0].data.data, "<f4")
        assert np.isfinite(arr).all()
    with pytest.raises(grpc.RpcError) as info:
        stub(zoo).Explain(pb.ExplainRequest(model="vqa", image=SCENE), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "question" in info.value.details()


def test_mixed_models_in_one_batch_call(zoo: BackgroundGateway) -> None:
    with Client(zoo.address, timeout=60) as client:
        outcomes = client.explain_batch(
            [
                ExplainRequest("resnet_gap", image=SCENE, request_id="a"),
                ExplainRequest("captioner", image=SCENE, request_id="b"),
                ExplainRequest("vqa", image=SCENE, question="what shape is it", request_id="c"),
                ExplainRequest(
                    "resnet_gap", image=SCENE, labels=("no_such_label",), request_id="d"
                ),
            ]
        )
        assert [o.ok for o in outcomes] == [True, True, True, False]
        assert [o.request_id for o in outcomes] == ["a", "b", "c", "d"]
        assert "no_such_label" in str(outcomes[3].error)  # type: ignore[union-attr]
        models = {m.name: m for m in client.list_models()}
    assert set(models) == {"resnet_gap", "captioner", "vqa"}
    assert models["vqa"].kind == "vqa" and "green" in models["vqa"].labels
    assert models["captioner"].vocab


@pytest.mark.slow
def test_efficientnet_lite0_on_a_real_photo_through_the_gateway() -> None:
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(buf, "JPEG", quality=95)
    gw = start(InProcessBackend.load(["efficientnet_lite0"], STORE))
    try:
        with Client(gw.address, timeout=120) as client:
            info = client.describe("efficientnet_lite0")
            assert info.kind == "classifier" and len(info.labels) == 1000
            assert info.input_size == (3, 224, 224)
            result = client.explain(
                ExplainRequest("efficientnet_lite0", image=buf.getvalue(), top_k=1,
                               methods=("gradcam",), output="box")
            )  # fmt: skip
    finally:
        gw.stop()
    assert result.predictions[0].label == "bell cote, bell cot"
    assert result.image_size == (640, 427)
    (target,) = result.targets
    x0, y0, x1, y1 = target.maps["gradcam"].box or (0, 0, 0, 0)
    # the box lies on the pagoda (60, 30)-(370, 390) of the photo, not on the whole photo
    assert x0 < 370 and x1 > 60 and y0 < 390 and y1 > 30
    assert (x1 - x0) * (y1 - y0) < 0.8 * 640 * 427

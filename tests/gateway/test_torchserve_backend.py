"""End to end: a real TorchServe (token auth on) behind the gateway.

The same items through the TorchServe backend and through the in-process
backend give the same responses (maps bit for bit; scores to the JSON's six
decimals); stopping TorchServe gives UNAVAILABLE, not a hang, and starting it
again resumes without restarting the gateway.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from camserve.gateway.convert import tensor_of
from camserve.gateway.inprocess import InProcessBackend
from camserve.gateway.proto import pb
from camserve.gateway.server import BackgroundGateway
from camserve.gateway.torchserve_backend import TorchServeBackend
from tests.gateway.conftest import start, stub
from tests.gateway.test_inprocess import SCENE, STORE

pytestmark = pytest.mark.slow

MODELS = ["resnet_gap", "captioner", "vqa"]


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from camserve.torchserve.config import ServeConfig
    from camserve.torchserve.process import TorchServe

    if shutil.which("java") is None:
        pytest.fail("TorchServe needs a Java runtime (scripts/install.sh installs one)")
    config = ServeConfig.free_ports(
        model_store=STORE, run_dir=tmp_path_factory.mktemp("ts"), models=MODELS
    )
    server = TorchServe(config)
    server.start()
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def remote(
    torchserve: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundGateway]:
    ts = torchserve
    backend = TorchServeBackend(
        ts.grpc_target,  # type: ignore[attr-defined]
        f"{ts.config.host}:{ts.config.grpc_management_port}",  # type: ignore[attr-defined]
        STORE,
        key_file=ts.key_file,  # type: ignore[attr-defined]
        timeout=60,
        stub_dir=tmp_path_factory.mktemp("stubs"),
    )
    gw = start(backend, max_batch_delay_ms=5, health_interval_s=0.2)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def local() -> Iterator[BackgroundGateway]:
    gw = start(InProcessBackend.load(MODELS, STORE))
    try:
        yield gw
    finally:
        gw.stop()


TENSOR = tensor_of(np.random.default_rng(3).standard_normal((3, 64, 64)).astype(np.float32))


def assert_same(a: pb.ExplainResponse, b: pb.ExplainResponse) -> None:
    assert (a.model, a.kind, a.layer, a.score, a.output) == (
        b.model,
        b.kind,
        b.layer,
        b.score,
        b.output,
    )
    assert (a.caption, list(a.words), a.question, a.answer) == (
        b.caption,
        list(b.words),
        b.question,
        b.answer,
    )
    assert a.image_size == b.image_size and a.input_size == b.input_size
    assert [(p.id, p.label) for p in a.predictions] == [(p.id, p.label) for p in b.predictions]
    for p, q in zip(a.predictions, b.predictions, strict=True):
        assert p.probability == pytest.approx(q.probability, abs=2e-6)
    assert len(a.targets) == len(b.targets)
    for s, t in zip(a.targets, b.targets, strict=True):
        assert (s.kind, s.label, s.id, s.position) == (t.kind, t.label, t.id, t.position)
        assert s.score == pytest.approx(t.score, abs=2e-6)
        assert [(m.method, m.layer, m.box) for m in s.maps] == [
            (m.method, m.layer, m.box) for m in t.maps
        ]
        assert [m.data for m in s.maps] == [m.data for m in t.maps]  # bit for bit
        assert [m.png for m in s.maps] == [m.png for m in t.maps]


@pytest.mark.parametrize(
    "msg",
    [
        pb.ExplainRequest(
            model="resnet_gap", image=SCENE, methods=["gradcam", "gradcampp"], top_k=2
        ),
        pb.ExplainRequest(
            model="resnet_gap",
            image=SCENE,
            methods=["layercam"],
            labels=["red_circle"],
            output=pb.OUTPUT_RAW,
            score=pb.SCORE_PROBABILITY,
        ),
        pb.ExplainRequest(
            model="captioner", image=SCENE, methods=["gradcam"], output=pb.OUTPUT_BOX
        ),
        pb.ExplainRequest(
            model="vqa",
            image=SCENE,
            question="what shape is it",
            answers=["circle"],
            methods=["gradcam", "guided_gradcam"],
        ),
        pb.ExplainRequest(model="resnet_gap", image=SCENE, predict_only=True, top_k=3),
        pb.ExplainRequest(
            model="resnet_gap", tensor=TENSOR, methods=["gradcam", "xgradcam"], top_k=2
        ),
        pb.ExplainRequest(
            model="vqa", tensor=TENSOR, question="what colour is it", predict_only=True
        ),
    ],
    ids=[
        "classifier", "classifier-raw", "captioner", "vqa", "predict-only", "tensor", "vqa-tensor",
    ],
)
def test_same_response_through_torchserve_and_in_process(
    remote: BackgroundGateway, local: BackgroundGateway, msg: pb.ExplainRequest
) -> None:
    assert_same(stub(remote).Explain(msg, timeout=120), stub(local).Explain(msg, timeout=120))


def test_errors_through_torchserve(remote: BackgroundGateway) -> None:
    s = stub(remote)
    for msg, code, word in [
        (
            pb.ExplainRequest(model="resnet_gap", image=SCENE, methods=["gradcamx"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "gradcamx",
        ),
        (pb.ExplainRequest(model="vqa", image=SCENE), grpc.StatusCode.INVALID_ARGUMENT, "question"),
        (pb.ExplainRequest(model="nope", image=SCENE), grpc.StatusCode.NOT_FOUND, "nope"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            s.Explain(msg, timeout=120)
        assert info.value.code() == code and word in info.value.details()
    models = s.ListModels(pb.ListModelsRequest(), timeout=120).models
    assert sorted(m.name for m in models) == sorted(MODELS)


def test_torchserve_stopped_then_started_again(
    torchserve: object, remote: BackgroundGateway
) -> None:
    ts = torchserve
    msg = pb.ExplainRequest(model="resnet_gap", image=SCENE)
    s = stub(remote)
    assert s.Explain(msg, timeout=120).targets
    ts.stop()  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        s.Explain(msg, timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 30
    ts.start()  # type: ignore[attr-defined]
    ts.wait_ready(timeout=240)  # type: ignore[attr-defined]
    assert s.Explain(msg, timeout=120).targets  # no gateway restart

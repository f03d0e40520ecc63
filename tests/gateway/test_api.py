"""Every RPC and every status code through a real gateway on a loopback port."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve.client import AsyncClient, Client
from camserve.errors import InvalidRequestError, UnavailableError
from camserve.gateway.convert import tensor_of
from camserve.gateway.proto import SERVICE_NAME, pb
from camserve.gateway.server import BackgroundGateway
from camserve.service.outcomes import ExplainError, ExplainResult
from camserve.service.request import ExplainRequest
from tests.gateway.conftest import LABELS, SIZE, EngineBackend, png, start, stub


def code_and_details(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()


def test_explain_answers_predictions_and_maps(gateway: BackgroundGateway) -> None:
    msg = pb.ExplainRequest(
        request_id="r1", model="tiny", image=png(1, 24), methods=["gradcam", "xgradcam"], top_k=2
    )
    out = stub(gateway).Explain(msg, timeout=30)
    assert out.request_id == "r1" and out.model == "tiny"
    assert out.kind == pb.MODEL_KIND_CLASSIFIER
    assert (out.image_size.width, out.image_size.height) == (24, 24)
    assert (out.input_size.width, out.input_size.height) == (SIZE, SIZE)
    assert len(out.predictions) == 3 and out.predictions[0].label in LABELS
    assert len(out.targets) == 2
    assert [t.id for t in out.targets] == [p.id for p in out.predictions[:2]]
    for target in out.targets:
        assert [m.method for m in target.maps] == ["gradcam", "xgradcam"]
        data = target.maps[0].data
        assert list(data.shape) == [SIZE, SIZE] and data.dtype == "float32"
        arr = np.frombuffer(data.data, "<f4")
        assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0
    assert "queue" in out.timings and "forward" in out.timings


def test_explain_with_a_raw_tensor_and_class_ids(gateway: BackgroundGateway) -> None:
    x = np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)
    msg = pb.ExplainRequest(
        model="tiny", tensor=tensor_of(x), class_ids=[3, 1], output=pb.OUTPUT_RAW
    )
    out = stub(gateway).Explain(msg, timeout=30)
    assert [t.id for t in out.targets] == [3, 1]
    assert [t.label for t in out.targets] == [LABELS[3], LABELS[1]]
    assert out.output == pb.OUTPUT_RAW


def test_explain_batch_answers_each_item_in_order(gateway: BackgroundGateway) -> None:
    reqs = [
        pb.ExplainRequest(request_id="a", model="tiny", image=png(1)),
        pb.ExplainRequest(request_id="b", model="nope", image=png(1)),
        pb.ExplainRequest(request_id="c", model="tiny", image=b"not an image"),
        pb.ExplainRequest(request_id="d", model="tiny", image=png(2), methods=["gradcamx"]),
        pb.ExplainRequest(request_id="e", model="tiny", image=png(3), top_k=3),
    ]
    out = stub(gateway).ExplainBatch(pb.ExplainBatchRequest(requests=reqs), timeout=30)
    kinds = [i.WhichOneof("outcome") for i in out.items]
    assert kinds == ["response", "error", "error", "error", "response"]
    assert out.items[0].response.request_id == "a"
    assert len(out.items[4].response.targets) == 3
    assert out.items[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "nope" in out.items[1].error.message
    assert out.items[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out.items[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "gradcamx" in out.items[3].error.message


def test_explain_batch_refuses_too_many_items(backend: EngineBackend) -> None:
    gw = start(backend, max_batch_items=2)
    try:
        reqs = [pb.ExplainRequest(model="tiny", image=png(i)) for i in range(3)]
        code, details = code_and_details(
            lambda: stub(gw).ExplainBatch(pb.ExplainBatchRequest(requests=reqs), timeout=30)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "3" in details
    finally:
        gw.stop()


def test_explain_stream_tags_answers_with_request_ids(gateway: BackgroundGateway) -> None:
    reqs = [pb.ExplainRequest(request_id=f"s{i}", model="tiny", image=png(i)) for i in range(6)]
    reqs.append(
        pb.ExplainRequest(request_id="bad", model="tiny", image=png(9), top_k=0, class_ids=[99])
    )
    answers = list(stub(gateway).ExplainStream(iter(reqs), timeout=30))
    by_id = {a.request_id: a for a in answers}
    assert set(by_id) == {f"s{i}" for i in range(6)} | {"bad"}
    assert by_id["bad"].HasField("error")
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert all(len(by_id[f"s{i}"].targets) == 1 for i in range(6))


def test_list_and_describe_models(gateway: BackgroundGateway) -> None:
    models = stub(gateway).ListModels(pb.ListModelsRequest(), timeout=30).models
    assert [m.name for m in models] == ["tiny"]
    info = stub(gateway).DescribeModel(pb.DescribeModelRequest(model="tiny"), timeout=30)
    assert info.kind == pb.MODEL_KIND_CLASSIFIER and list(info.labels) == list(LABELS)
    assert info.default_layer in info.layers
    assert (info.input_channels, info.input_size.height, info.input_size.width) == (3, SIZE, SIZE)
    methods = {m.id: m for m in info.methods}
    assert methods["scorecam"].cost == "rerun" and methods["gradcam"].cost == "single_pass"
    assert "mask" in {o.name for o in methods["occlusion"].options}
    assert info.device == "cpu" and info.layout == "auto"


@pytest.mark.parametrize(
    ("msg", "code", "words"),
    [
        (pb.ExplainRequest(model="nope", image=b"x"), grpc.StatusCode.NOT_FOUND, ["nope", "tiny"]),
        (pb.ExplainRequest(model="", image=b"x"), grpc.StatusCode.INVALID_ARGUMENT, ["model"]),
        (pb.ExplainRequest(model="tiny"), grpc.StatusCode.INVALID_ARGUMENT, ["image", "tensor"]),
        (
            pb.ExplainRequest(model="tiny", image=png(0), methods=["gradcamx"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["method", "gradcamx"],
        ),
        (
            pb.ExplainRequest(model="tiny", image=png(0), layer="fc9"),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["layer", "fc9"],
        ),
        (
            pb.ExplainRequest(model="tiny", tensor=pb.Tensor(shape=[3, 2], dtype="float64")),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["tensor.dtype", "float64"],
        ),
        (
            pb.ExplainRequest(model="tiny", tensor=pb.Tensor(shape=[3, 2], dtype="float32")),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["tensor.data", "0 bytes"],
        ),
        (
            pb.ExplainRequest(model="tiny", image=png(0), score=7),  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
            ["score", "7"],
        ),
        (
            pb.ExplainRequest(model="tiny", image=b"\x89PNG garbage"),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["image"],
        ),
    ],
)
def test_status_codes_of_callers_mistakes(
    gateway: BackgroundGateway, msg: pb.ExplainRequest, code: grpc.StatusCode, words: list[str]
) -> None:
    got, details = code_and_details(lambda: stub(gateway).Explain(msg, timeout=30))
    assert got == code, details
    for w in words:
        assert w in details


def test_describe_unknown_model_is_not_found(gateway: BackgroundGateway) -> None:
    code, details = code_and_details(
        lambda: stub(gateway).DescribeModel(pb.DescribeModelRequest(model="nope"), timeout=30)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


def test_backend_down_is_unavailable_not_a_hang(backend: EngineBackend) -> None:
    gw = start(backend)
    try:
        backend.down = True
        t0 = time.monotonic()
        code, details = code_and_details(
            lambda: stub(gw).Explain(pb.ExplainRequest(model="tiny", image=png(0)), timeout=30)
        )
        assert code == grpc.StatusCode.UNAVAILABLE and "down" in details
        assert time.monotonic() - t0 < 5
        backend.down = False  # comes back: answers again without a restart
        assert stub(gw).Explain(pb.ExplainRequest(model="tiny", image=png(0)), timeout=30).targets
    finally:
        gw.stop()


class FlakyBackend(EngineBackend):
    """Unavailable for its first ``failures`` calls."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def run(self, requests):  # type: ignore[no-untyped-def]
        self.attempts += 1
        if self.attempts <= self.failures:
            raise UnavailableError("warming up")
        return super().run(requests)


def test_client_retries_unavailable_with_its_service_config() -> None:
    backend = FlakyBackend(failures=2)
    gw = start(backend)
    try:
        with Client(gw.address) as client:
            result = client.explain(ExplainRequest("tiny", image=png(0)))
        assert result.targets and backend.attempts == 3
        backend.attempts = 0
        with Client(gw.address, retries=False) as client, pytest.raises(UnavailableError):
            client.explain(ExplainRequest("tiny", image=png(0)))
    finally:
        gw.stop()


def test_client_sync_and_async_give_typed_results(gateway: BackgroundGateway) -> None:
    req = ExplainRequest(
        "tiny", image=png(5), methods=("gradcam", "layercam"), top_k=2, request_id="x", output="raw"
    )
    with Client(gateway.address) as client:
        sync = client.explain(req)
        outcomes = client.explain_batch(
            [req, ExplainRequest("tiny", image=png(5), class_ids=(99,))]
        )
        with pytest.raises(InvalidRequestError, match="nope"):
            client.explain(ExplainRequest("nope", image=png(5)))
        assert [m.name for m in client.list_models()] == ["tiny"]
        assert client.describe("tiny").kind == "classifier"

    async def run_async() -> ExplainResult:
        async with AsyncClient(gateway.address) as aclient:
            streamed = [o async for o in aclient.explain_stream([req])]
            assert isinstance(streamed[0], ExplainResult)
            return await aclient.explain(req)

    asynced = asyncio.run(run_async())
    assert isinstance(sync, ExplainResult) and sync.request_id == "x"
    assert isinstance(outcomes[0], ExplainResult)
    assert isinstance(outcomes[1], ExplainError)
    for a, b in zip(sync.targets, asynced.targets, strict=True):
        for m in ("gradcam", "layercam"):
            da, db = a.maps[m].data, b.maps[m].data
            assert da is not None and db is not None
            np.testing.assert_allclose(da, db, atol=1e-6)


def test_health_overall_and_per_model(backend: EngineBackend) -> None:
    gw = start(backend)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(gw.address))
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", SERVICE_NAME, "tiny"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
        code, _ = code_and_details(
            lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"))
        )
        assert code == grpc.StatusCode.NOT_FOUND
        backend.down = True
        deadline = time.monotonic() + 10
        status = serving
        while status == serving and time.monotonic() < deadline:
            time.sleep(0.05)
            status = health.Check(health_pb2.HealthCheckRequest(service="tiny")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        overall = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert overall == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        backend.down = False
        gw.stop()


def test_metrics_on_the_gateways_own_port(gateway: BackgroundGateway) -> None:
    stub(gateway).Explain(pb.ExplainRequest(model="tiny", image=png(0)), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub(gateway).Explain(pb.ExplainRequest(model="tiny", image=b"x"), timeout=30)
    port = gateway.gateway.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert (
        'camserve_gateway_request_latency_seconds_count{device="cpu",kind="classifier",'
        'method="Explain",model="tiny",status="OK"} 1.0'
    ) in text
    assert (
        'camserve_gateway_errors_total{code="INVALID_ARGUMENT",device="cpu",'
        'method="Explain",model="tiny"} 1.0'
    ) in text
    assert 'camserve_gateway_batch_size_count{device="cpu",model="tiny"}' in text
    assert 'camserve_gateway_queue_seconds_count{device="cpu",model="tiny"}' in text
    assert 'camserve_gateway_in_flight{device="cpu",model="tiny"} 0.0' in text


class Exploding(torch.nn.Module):
    """A model that fails on every input (as a model with a bug does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch inside the model")


def test_a_failing_model_is_internal_and_the_gateway_keeps_serving(backend: EngineBackend) -> None:
    gw = start(backend)
    try:
        good = backend.model
        backend.model = Exploding()
        code, details = code_and_details(
            lambda: stub(gw).Explain(pb.ExplainRequest(model="tiny", image=png(0)), timeout=30)
        )
        assert code == grpc.StatusCode.INTERNAL
        assert "shape mismatch" not in details  # internals stay in the server's log
        backend.model = good
        assert stub(gw).Explain(pb.ExplainRequest(model="tiny", image=png(0)), timeout=30).targets
    finally:
        gw.stop()

"""Bearer tokens, TLS (with client certificates), reflection, and the batcher's deadline check."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from pydantic import ValidationError

from camserve.client import Client
from camserve.errors import DeadlineExceededError, UnavailableError
from camserve.gateway.batcher import BatchPolicy, ModelQueue
from camserve.gateway.proto import SERVICE_NAME, pb, pb_grpc
from camserve.gateway.server import BackgroundGateway
from camserve.gateway.settings import GatewaySettings
from camserve.gateway.status import RemoteError
from camserve.service.outcomes import ExplainError
from camserve.service.request import ExplainRequest
from tests.gateway.conftest import LABELS, EngineBackend, png, start


def test_token_is_required_off_loopback() -> None:
    with pytest.raises(ValidationError, match="loopback"):
        GatewaySettings(host="0.0.0.0")
    assert GatewaySettings(host="0.0.0.0", token="s3cret").token is not None
    assert GatewaySettings(host="::1").token is None


def test_bearer_token_check(backend: EngineBackend) -> None:
    gw = start(backend, token="s3cret")
    try:
        channel = grpc.insecure_channel(gw.address)
        s = pb_grpc.ExplanationServiceStub(channel)
        msg = pb.ExplainRequest(model="tiny", image=png(0))
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as info:
                s.Explain(msg, timeout=30, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(s.ExplainStream(iter([msg]), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = s.Explain(msg, timeout=30, metadata=(("authorization", "Bearer s3cret"),))
        assert ok.targets
        # health stays open for probes
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == 1
        with Client(gw.address, token="s3cret") as client:
            assert client.explain(ExplainRequest("tiny", image=png(0))).targets
        with Client(gw.address) as client, pytest.raises(RemoteError, match="UNAUTHENTICATED"):
            client.explain(ExplainRequest("tiny", image=png(0)))
    finally:
        gw.stop()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    ca_key, ca = tmp_path / "ca.key", tmp_path / "ca.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "1",
        "-subj",
        "/CN=camserve test CA",
    )
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        key, csr, pem = (tmp_path / f"{name}.{s}" for s in ("key", "csr", "pem"))
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={name}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(pem),
            "-days",
            "1",
            "-extfile",
            str(ext),
        )
    return tmp_path


def test_tls_with_client_certificates(backend: EngineBackend, pki: Path) -> None:
    gw = start(
        backend,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    try:
        ca = (pki / "ca.pem").read_bytes()
        with Client(
            gw.address,
            root_certificates=ca,
            certificate_chain=(pki / "client.pem").read_bytes(),
            private_key=(pki / "client.key").read_bytes(),
        ) as client:
            assert client.explain(ExplainRequest("tiny", image=png(0))).targets
        # without a client certificate the handshake fails
        bare = Client(gw.address, root_certificates=ca, retries=False, timeout=5)
        with bare, pytest.raises(UnavailableError):
            bare.explain(ExplainRequest("tiny", image=png(0)))
        # a plaintext client cannot talk to it
        with (
            Client(gw.address, retries=False, timeout=5) as client,
            pytest.raises(UnavailableError),
        ):
            client.explain(ExplainRequest("tiny", image=png(0)))
    finally:
        gw.stop()


def test_reflection_lists_services_and_drives_a_generic_client(
    gateway: BackgroundGateway,
) -> None:
    channel = grpc.insecure_channel(gateway.address)
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names

    # A generic client: descriptors from reflection only, in a fresh pool (no stubs).
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE_NAME)
    method = service.FindMethodByName("Explain")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    assert request_cls is not pb.ExplainRequest
    request = request_cls(model="tiny", image=png(0), methods=["gradcam"], top_k=2)
    call = channel.unary_unary(
        f"/{SERVICE_NAME}/Explain",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    response = call(request, timeout=30)
    assert response.model == "tiny" and len(response.targets) == 2
    assert response.targets[0].label in LABELS
    assert response.targets[0].maps[0].method == "gradcam"


def test_batcher_does_not_compute_an_item_past_its_deadline() -> None:
    backend = EngineBackend()

    async def main() -> tuple[object, object]:
        queue = ModelQueue("tiny", backend.run, BatchPolicy(max_batch_size=4))
        past = queue.submit(
            ExplainRequest("tiny", image=png(0), request_id="late", deadline=time.monotonic() - 1)
        )
        ok = queue.submit(ExplainRequest("tiny", image=png(1), request_id="ok"))
        out = await past.future, await ok.future
        await queue.close(5)
        return out

    late, ok = asyncio.run(main())
    assert isinstance(late, ExplainError) and isinstance(late.error, DeadlineExceededError)
    assert "not computed" in str(late.error)
    assert not isinstance(ok, ExplainError)
    assert backend.computed == ["ok"]

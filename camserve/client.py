"""Python client of the camserve gRPC gateway, synchronous (:class:`Client`) and
asyncio (:class:`AsyncClient`).

Example:
    >>> from camserve.client import Client  # doctest: +SKIP
    >>> from camserve.service.request import ExplainRequest  # doctest: +SKIP
    >>> with Client("127.0.0.1:50051") as client:  # doctest: +SKIP
    ...     result = client.explain(ExplainRequest("resnet_gap", image=png, top_k=2))
    ...     result.targets[0].maps["gradcam"].box

Calls take a deadline (``timeout`` seconds, default 30 s; a request's own
``deadline`` wins). UNAVAILABLE is retried by gRPC itself with the service
config :data:`SERVICE_CONFIG`: up to 4 attempts, exponential backoff from
0.1 s to 2 s; nothing else is retried (a caller's mistake stays one). Errors
are raised as camserve errors (:func:`camserve.gateway.status.error_of`):
``InvalidRequestError`` (INVALID_ARGUMENT, NOT_FOUND), ``OverloadedError``,
``DeadlineExceededError``, ``UnavailableError``, ...
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc

from camserve.errors import CamserveError
from camserve.gateway.convert import description_from_proto, request_to_proto, result_from_proto
from camserve.gateway.proto import SERVICE_NAME, pb, pb_grpc
from camserve.gateway.status import error_of
from camserve.service import ModelDescription
from camserve.service.outcomes import ExplainError, ExplainResult, Outcome
from camserve.service.request import ExplainRequest

__all__ = ["SERVICE_CONFIG", "AsyncClient", "Client", "channel_options"]

SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
"""The gRPC service config of the client: retries of UNAVAILABLE only."""


def channel_options(
    max_message_bytes: int = 8 * 1024 * 1024, retries: bool = True
) -> list[tuple[str, Any]]:
    """Channel options: the service config (retries), message size limits."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if retries:
        options.append(("grpc.service_config", json.dumps(SERVICE_CONFIG)))
    return options


def _channel(
    api: Any,
    target: str,
    options: list[tuple[str, Any]],
    tls: bool,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
) -> Any:
    """A channel of ``api`` (``grpc`` or ``grpc.aio``, which share the factory signatures):
    TLS when asked or when ``root_certificates`` are given, else plaintext."""
    if tls or root_certificates is not None:
        creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        return api.secure_channel(target, creds, options=options)
    return api.insecure_channel(target, options=options)


def _outcome(item: pb.ExplainBatchItem, request: ExplainRequest) -> Outcome:
    if item.HasField("error"):
        return ExplainError(
            request.request_id, request.model, error_of(item.error.code, item.error.message)
        )
    return result_from_proto(item.response)


def _stream_outcome(msg: pb.ExplainResponse) -> Outcome:
    if msg.HasField("error"):
        return ExplainError(msg.request_id, msg.model, error_of(msg.error.code, msg.error.message))
    return result_from_proto(msg)


def _raised(exc: grpc.RpcError) -> CamserveError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_of(code, details or "")


class _Base:
    def __init__(self, token: str | None, timeout: float | None) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def _timeout(self, requests: Iterable[ExplainRequest], timeout: float | None) -> float | None:
        deadlines = [r.deadline for r in requests if r.deadline is not None]
        if deadlines:
            return max(0.0, min(deadlines) - time.monotonic())
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Synchronous client.

    Args:
        target: ``host:port`` of the gateway.
        token: the bearer token, if the gateway wants one.
        root_certificates: PEM CA bundle: TLS on (None with ``tls=True``: the system's).
        certificate_chain, private_key: the client's certificate (mutual TLS).
        tls: use TLS even without ``root_certificates``.
        timeout: default deadline of every call, seconds (None: none).
        retries: retry UNAVAILABLE (:data:`SERVICE_CONFIG`).
        max_message_bytes: largest message sent or received.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls: bool = False,
        timeout: float | None = 30.0,
        retries: bool = True,
        max_message_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        super().__init__(token, timeout)
        options = channel_options(max_message_bytes, retries)
        self.channel: grpc.Channel = _channel(
            grpc, target, options, tls, root_certificates, certificate_chain, private_key
        )
        self.stub = pb_grpc.ExplanationServiceStub(self.channel)

    def explain(self, request: ExplainRequest, timeout: float | None = None) -> ExplainResult:
        """Explains one item.

        Raises:
            CamserveError: the item's error (see the module docstring).
        """
        try:
            msg = self.stub.Explain(
                request_to_proto(request),
                timeout=self._timeout([request], timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return result_from_proto(msg)

    def explain_batch(
        self, requests: Sequence[ExplainRequest], timeout: float | None = None
    ) -> list[Outcome]:
        """Explains many items in one call: one outcome per request, in order."""
        try:
            msg = self.stub.ExplainBatch(
                pb.ExplainBatchRequest(requests=[request_to_proto(r) for r in requests]),
                timeout=self._timeout(requests, timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return [_outcome(i, r) for i, r in zip(msg.items, requests, strict=True)]

    def explain_stream(
        self, requests: Iterable[ExplainRequest], timeout: float | None = None
    ) -> Iterator[Outcome]:
        """Streams items; yields outcomes as they finish (match them by ``request_id``)."""
        calls = (request_to_proto(r) for r in requests)
        try:
            for msg in self.stub.ExplainStream(
                calls,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            ):
                yield _stream_outcome(msg)
        except grpc.RpcError as exc:
            raise _raised(exc) from exc

    def list_models(self, timeout: float | None = None) -> list[ModelDescription]:
        """Every served model."""
        try:
            msg = self.stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout([], timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return [description_from_proto(m) for m in msg.models]

    def describe(self, model: str, timeout: float | None = None) -> ModelDescription:
        """One model's description."""
        try:
            msg = self.stub.DescribeModel(
                pb.DescribeModelRequest(model=model),
                timeout=self._timeout([], timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return description_from_proto(msg)

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client (``grpc.aio``); the same arguments and methods as :class:`Client`."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls: bool = False,
        timeout: float | None = 30.0,
        retries: bool = True,
        max_message_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        super().__init__(token, timeout)
        options = channel_options(max_message_bytes, retries)
        self.channel: grpc.aio.Channel = _channel(
            grpc.aio, target, options, tls, root_certificates, certificate_chain, private_key
        )
        self.stub = pb_grpc.ExplanationServiceStub(self.channel)

    async def explain(self, request: ExplainRequest, timeout: float | None = None) -> ExplainResult:
        """Explains one item (see :meth:`Client.explain`)."""
        try:
            msg = await self.stub.Explain(
                request_to_proto(request),
                timeout=self._timeout([request], timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return result_from_proto(msg)

    async def explain_batch(
        self, requests: Sequence[ExplainRequest], timeout: float | None = None
    ) -> list[Outcome]:
        """Explains many items in one call (see :meth:`Client.explain_batch`)."""
        try:
            msg = await self.stub.ExplainBatch(
                pb.ExplainBatchRequest(requests=[request_to_proto(r) for r in requests]),
                timeout=self._timeout(requests, timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return [_outcome(i, r) for i, r in zip(msg.items, requests, strict=True)]

    async def explain_stream(
        self, requests: Iterable[ExplainRequest], timeout: float | None = None
    ) -> AsyncIterator[Outcome]:
        """Streams items; yields outcomes as they finish."""
        call = self.stub.ExplainStream(
            (request_to_proto(r) for r in requests),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
        try:
            async for msg in call:
                yield _stream_outcome(msg)
        except grpc.RpcError as exc:
            raise _raised(exc) from exc

    async def list_models(self, timeout: float | None = None) -> list[ModelDescription]:
        """Every served model."""
        try:
            msg = await self.stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout([], timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return [description_from_proto(m) for m in msg.models]

    async def describe(self, model: str, timeout: float | None = None) -> ModelDescription:
        """One model's description."""
        try:
            msg = await self.stub.DescribeModel(
                pb.DescribeModelRequest(model=model),
                timeout=self._timeout([], timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _raised(exc) from exc
        return description_from_proto(msg)

    async def close(self) -> None:
        """Closes the channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

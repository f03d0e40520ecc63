"""The gateway server: the ExplanationService, the standard health service (overall
and per model), server reflection, TLS, a bearer-token check and Prometheus metrics.

``Gateway`` runs on an asyncio loop (``await gateway.start()`` ...
``await gateway.stop()``); :func:`serve` runs one in the foreground until
SIGINT/SIGTERM; :class:`BackgroundGateway` runs one on a thread (tests,
benchmarks, embedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from camserve.gateway.backends import Backend
from camserve.gateway.batcher import BatchPolicy, Dispatcher
from camserve.gateway.metrics import GatewayMetrics
from camserve.gateway.proto import SERVICE_NAME, pb_grpc
from camserve.gateway.servicer import ExplanationServicer
from camserve.gateway.settings import GatewaySettings

__all__ = ["BackgroundGateway", "Gateway", "TokenInterceptor", "serve"]

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    The health service stays open (load balancers and orchestrators probe it
    without credentials). Tokens are compared in constant time.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        """Passes authorized calls on; answers the others UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        sent_bytes = sent.encode() if isinstance(sent, str) else bytes(sent)
        if hmac.compare_digest(sent_bytes, self._expected):
            return handler
        return _refusal(handler)


def _refusal(handler: Any) -> Any:
    message = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


def _credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class Gateway:
    """One gateway over one backend.

    Args:
        backend: what answers the items.
        settings: the gateway's settings.
        registry: the Prometheus registry of the gateway's metrics (default: a
            new one); give the one the backend's service records to, so that its
            stage metrics are served too.

    Attributes:
        port: the bound gRPC port (after :meth:`start`).
        metrics_port: the bound metrics port, or None when metrics are off.
    """

    def __init__(self, backend: Backend, settings: GatewaySettings, registry: Any = None) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = GatewayMetrics(backend.device, registry)
        self.port = 0
        self.metrics_port: int | None = None
        self.dispatcher: Dispatcher | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._health_task: asyncio.Task[None] | None = None
        self._health_names: set[str] = set()
        self._metrics_server: Any = None

    async def start(self) -> None:
        """Binds the ports and starts serving (reads the model names from the backend first)."""
        s = self.settings
        policy = BatchPolicy(s.max_batch_size, s.max_batch_delay_ms / 1000.0, s.max_queue_size)
        self.dispatcher = Dispatcher(
            self.backend.run, self.backend.model_names, policy, self.metrics
        )
        with contextlib.suppress(Exception):  # a backend that is down now may come up later
            await asyncio.to_thread(self.dispatcher.refresh)
        interceptors = [TokenInterceptor(s.token.get_secret_value())] if s.token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
            ],
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        servicer = ExplanationServicer(
            self.backend, self.dispatcher, self.metrics, s.max_batch_items
        )
        pb_grpc.add_ExplanationServiceServicer_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        address = f"{s.host}:{s.port}"
        creds = _credentials(s)
        if creds is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, creds)
        await server.start()
        self._server = server
        await self._check_health()
        self._health_task = asyncio.create_task(self._watch_health())
        if s.metrics_port is not None:
            self._metrics_server, self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
        log.info("gateway on %s:%d (metrics on %s)", s.host, self.port, self.metrics_port)

    async def _check_health(self) -> None:
        assert self.dispatcher is not None
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            names = await asyncio.to_thread(self.dispatcher.refresh)
            ready = {n: await asyncio.to_thread(self.backend.ready, n) for n in sorted(names)}
        except Exception:  # the backend cannot be reached: every model it had is down
            ready = {}
        for name in self._health_names - set(ready):
            ready[name] = False
        self._health_names |= set(ready)
        for name, ok in ready.items():
            await self._health.set(name, serving if ok else not_serving)
        overall = serving if ready and all(ready.values()) else not_serving
        await self._health.set("", overall)
        await self._health.set(SERVICE_NAME, overall)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self._check_health()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health says NOT_SERVING, new calls are refused, queued items
        get UNAVAILABLE, items in flight finish within ``grace`` seconds (default: the setting)."""
        grace = self.settings.grace_s if grace is None else grace
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.dispatcher is not None:
            await self.dispatcher.close(grace)
        if self._server is not None:
            await self._server.stop(grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def wait(self) -> None:
        """Until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()


def serve(
    backend: Backend,
    settings: GatewaySettings,
    ready: Callable[[Gateway], None] | None = None,
    registry: Any = None,
) -> None:
    """Runs a gateway in the foreground until SIGINT or SIGTERM, then stops it gracefully.

    Args:
        backend: what answers the items.
        settings: the gateway's settings.
        ready: called once the ports are bound (prints the addresses in the CLI).
        registry: the Prometheus registry (see :class:`Gateway`).
    """

    async def main() -> None:
        gateway = Gateway(backend, settings, registry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # The handlers go in before ``ready`` announces the gateway, so a signal sent
        # as soon as "Ctrl-C stops it" is read still takes the graceful path.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await gateway.start()
        if ready is not None:
            ready(gateway)
        await stop.wait()
        log.info("stopping the gateway (grace %.1f s)", settings.grace_s)
        await gateway.stop()

    asyncio.run(main())


class BackgroundGateway:
    """A gateway on its own thread and event loop.

    Example:
        >>> with BackgroundGateway(backend, GatewaySettings(port=0)) as gw:  # doctest: +SKIP
        ...     channel = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
    """

    def __init__(self, backend: Backend, settings: GatewaySettings) -> None:
        self.gateway = Gateway(backend, settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.gateway.port

    @property
    def address(self) -> str:
        """``host:port`` to connect to."""
        return f"{self.gateway.settings.host}:{self.gateway.port}"

    def call(self, coro: Awaitable[Any], timeout: float | None = 60.0) -> Any:
        """Runs a coroutine on the gateway's loop and waits for its result."""

        async def wrapped() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout)

    def start(self) -> BackgroundGateway:
        """Starts the thread and the gateway; returns once the ports are bound."""
        self._thread.start()
        self.call(self.gateway.start())
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stops the gateway gracefully, then the loop and the thread."""
        if not self._thread.is_alive():
            return
        try:
            self.call(self.gateway.stop(grace), timeout=None)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()

    def __enter__(self) -> BackgroundGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

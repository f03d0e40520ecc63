"""The gateway's Prometheus metrics, served on its own port.

Every metric has a ``device`` label (``cpu``, ``cuda:0``: where the backend runs).
Latencies are histograms in seconds with the service's buckets
(:data:`camserve.service.metrics.LATENCY_BUCKETS`, 0.1 ms to 60 s). With the
in-process backend the service's own stage and method metrics are served from
the same registry.

| metric | type | labels |
| --- | --- | --- |
| ``camserve_gateway_request_latency_seconds`` | histogram | model, method, kind, status, device |
| ``camserve_gateway_queue_seconds`` | histogram | model, device |
| ``camserve_gateway_batch_size`` | histogram | model, device |
| ``camserve_gateway_in_flight`` | gauge | model, device |
| ``camserve_gateway_errors_total`` | counter | model, method, code, device |

``method`` is the RPC method (``Explain``, ``ExplainBatch``, ``ExplainStream``),
``kind`` the model kind, ``status`` and ``code`` the gRPC status code name.
"""

from __future__ import annotations

from typing import Any

import prometheus_client as prom

from camserve.service.metrics import LATENCY_BUCKETS

__all__ = ["GatewayMetrics"]
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class GatewayMetrics:
    """The gateway's metrics in one registry.

    Args:
        device: the ``device`` label.
        registry: where they are registered (default: a new registry, so that
            several gateways can live in one process).
    """

    def __init__(self, device: str, registry: prom.CollectorRegistry | None = None) -> None:
        self.device = device
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        kw: dict[str, Any] = {"registry": self.registry}
        self.latency = prom.Histogram(
            "camserve_gateway_request_latency_seconds",
            "Time from receiving an item to its answer, per item.",
            ["model", "method", "kind", "status", "device"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.queue = prom.Histogram(
            "camserve_gateway_queue_seconds",
            "Time an item waited in its model's queue before its batch started.",
            ["model", "device"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.batch = prom.Histogram(
            "camserve_gateway_batch_size",
            "Items per backend call.",
            ["model", "device"],
            buckets=_BATCH_BUCKETS,
            **kw,
        )
        self.in_flight = prom.Gauge(
            "camserve_gateway_in_flight",
            "Items received and not yet answered (queued or computing).",
            ["model", "device"],
            **kw,
        )
        self.errors = prom.Counter(
            "camserve_gateway_errors",
            "Items answered with an error, by gRPC status code.",
            ["model", "method", "code", "device"],
            **kw,
        )

    def observe(self, model: str, method: str, kind: str, code: str, seconds: float) -> None:
        """Records one answered item (its latency, and its error if ``code`` is not OK)."""
        self.latency.labels(model, method, kind, code, self.device).observe(seconds)
        if code != "OK":
            self.errors.labels(model, method, code, self.device).inc()

    def batch_started(self, model: str, size: int, waits: list[float]) -> None:
        """Records a backend call: its size and each item's time in the queue."""
        self.batch.labels(model, self.device).observe(size)
        queue = self.queue.labels(model, self.device)
        for w in waits:
            queue.observe(w)

    def enter(self, model: str) -> None:
        """An item was received."""
        self.in_flight.labels(model, self.device).inc()

    def leave(self, model: str) -> None:
        """An item was answered."""
        self.in_flight.labels(model, self.device).dec()

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Starts the ``/metrics`` HTTP server in a thread: (server, bound port)."""
        server, _thread = prom.start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)

"""Every metric camserve exports, declared once, with adapters for two back-ends.

Latencies are histograms in seconds with buckets from 0.1 ms to 60 s
(:data:`LATENCY_BUCKETS`: explanation work ranges from a cached Grad-CAM to a
Score-CAM of a large batch), with a small fixed label set: model, method, stage,
status, device. The TorchServe handlers record through
:class:`camserve.torchserve.metrics.TorchServeMetrics` (TorchServe forwards them
to its Prometheus endpoint, but only metrics declared in its metrics YAML:
``deploy/torchserve/metrics.yaml`` must list all of :data:`METRICS`, a test
checks it); the gRPC gateway records through :class:`PrometheusMetrics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "LATENCY_BUCKETS",
    "METHOD_LATENCY",
    "METRICS",
    "REQUESTS",
    "REQUEST_LATENCY",
    "STAGE_LATENCY",
    "MetricSpec",
    "MetricsSink",
    "NullMetrics",
    "PrometheusMetrics",
    "label_values",
    "record_batch",
    "torchserve_model_metrics",
]

Kind = Literal["histogram", "counter"]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Histogram bucket bounds in seconds: 0.1 ms to 60 s."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, kind, label names, unit and help text."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    unit: str = "Seconds"


REQUEST_LATENCY = MetricSpec(
    "camserve_request_latency_seconds",
    "histogram",
    ("model", "status"),
    "Time from decoding to the encoded response, per request.",
)
STAGE_LATENCY = MetricSpec(
    "camserve_stage_latency_seconds",
    "histogram",
    ("model", "stage", "device"),
    "Time per stage of a batch (decode, forward, backward, upsample, encode, ...).",
)
METHOD_LATENCY = MetricSpec(
    "camserve_method_latency_seconds",
    "histogram",
    ("model", "method", "device"),
    "Time spent computing one method's maps for a batch (after the shared forward/backward).",
)
REQUESTS = MetricSpec(
    "camserve_requests_total",
    "counter",
    ("model", "status"),
    "Requests answered, by status (ok or the error type).",
    unit="Count",
)
METRICS: tuple[MetricSpec, ...] = (REQUEST_LATENCY, STAGE_LATENCY, METHOD_LATENCY, REQUESTS)


class MetricsSink(Protocol):
    """Where metric values go."""

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        """Observes a histogram value, or adds ``value`` to a counter."""


class NullMetrics:
    """Discards everything (tests, offline use)."""

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        """Does nothing."""


def label_values(spec: MetricSpec, labels: Mapping[str, str]) -> list[str]:
    """The label values of ``labels`` in ``spec``'s declaration order.

    Raises:
        KeyError: a label of the spec is missing.
    """
    missing = [n for n in spec.labels if n not in labels]
    if missing:
        raise KeyError(f"metric {spec.name} needs labels {missing}")
    return [str(labels[n]) for n in spec.labels]


class PrometheusMetrics:
    """Adapter for ``prometheus_client`` (the gRPC gateway).

    Args:
        registry: a ``prometheus_client.CollectorRegistry`` (default: the global one).
    """

    def __init__(self, registry: Any = None) -> None:
        import prometheus_client as prom

        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        self._metrics: dict[str, Any] = {}
        for spec in METRICS:
            if spec.kind == "histogram":
                self._metrics[spec.name] = prom.Histogram(
                    spec.name, spec.help, list(spec.labels), buckets=LATENCY_BUCKETS, **kw
                )
            else:
                name = spec.name.removesuffix("_total")
                self._metrics[spec.name] = prom.Counter(name, spec.help, list(spec.labels), **kw)

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        """Observes the value (histogram) or increments by it (counter)."""
        child = self._metrics[spec.name].labels(*label_values(spec, labels))
        if spec.kind == "histogram":
            child.observe(float(value))
        else:
            child.inc(float(value))


def record_batch(
    sink: MetricsSink,
    model: str,
    timings: Mapping[str, float],
    requests: list[tuple[str, float]],
    device: str = "cpu",
) -> None:
    """Records one batch: stage and method timings, then each request's status and latency.

    Args:
        sink: where to record.
        model: the model name label.
        timings: seconds per stage; ``method.<id>`` keys go to the method histogram.
        requests: (status, seconds) per request; status is ``ok`` or an error
            type; seconds are the request's own latency.
        device: the device label (``cpu``, ``cuda:0``).
    """
    for key, seconds in timings.items():
        if key.startswith("method."):
            labels = {"model": model, "method": key[7:], "device": device}
            sink.record(METHOD_LATENCY, seconds, labels)
        else:
            sink.record(STAGE_LATENCY, seconds, {"model": model, "stage": key, "device": device})
    for status, seconds in requests:
        sink.record(REQUEST_LATENCY, seconds, {"model": model, "status": status})
        sink.record(REQUESTS, 1.0, {"model": model, "status": status})


def torchserve_model_metrics() -> dict[str, list[dict[str, object]]]:
    """The ``model_metrics`` section TorchServe's metrics YAML needs for :data:`METRICS`."""
    out: dict[str, list[dict[str, object]]] = {}
    for spec in METRICS:
        out.setdefault(spec.kind, []).append(
            {"name": spec.name, "unit": spec.unit, "dimensions": list(spec.labels)}
        )
    return out

"""Every metric camserve exports, declared once, with adapters for two back-ends.

Latencies are histograms in seconds (Prometheus' default buckets, 5 ms to 10 s),
with a small fixed label set: model, method, stage, status. The TorchServe
handlers record through :class:`TorchServeMetrics` (TorchServe forwards them to
its Prometheus endpoint, but only metrics declared in its metrics YAML:
``deploy/torchserve/metrics.yaml`` must list all of :data:`METRICS`, a test
checks it); the gRPC gateway records through :class:`PrometheusMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "METHOD_LATENCY",
    "METRICS",
    "REQUESTS",
    "REQUEST_LATENCY",
    "STAGE_LATENCY",
    "MetricSpec",
    "MetricsSink",
    "NullMetrics",
    "PrometheusMetrics",
    "TorchServeMetrics",
    "record_batch",
    "torchserve_model_metrics",
]

Kind = Literal["histogram", "counter"]


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
    ("model", "stage"),
    "Time per stage of a batch (decode, preprocess, forward, backward, upsample, encode, ...).",
)
METHOD_LATENCY = MetricSpec(
    "camserve_method_latency_seconds",
    "histogram",
    ("model", "method"),
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


def _values(spec: MetricSpec, labels: Mapping[str, str]) -> list[str]:
    missing = [n for n in spec.labels if n not in labels]
    if missing:
        raise KeyError(f"metric {spec.name} needs labels {missing}")
    return [str(labels[n]) for n in spec.labels]


class TorchServeMetrics:
    """Adapter for TorchServe's ``context.metrics`` (a metrics cache from the YAML).

    Args:
        cache: ``context.metrics`` of the handler.
        metric_type: TorchServe's ``MetricTypes`` enum (passed in, so that this
            module does not import ``ts``); ``metric_type("histogram")`` must work.
    """

    def __init__(self, cache: Any, metric_type: Callable[[str], Any]) -> None:
        self._cache = cache
        self._type = metric_type
        self._metrics: dict[str, Any] = {}

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        """Emits one value with the declared dimensions, in declaration order."""
        if self._cache is None:
            return
        metric = self._metrics.get(spec.name)
        if metric is None:
            metric = self._cache.get_metric(spec.name, self._type(spec.kind))
            self._metrics[spec.name] = metric
        # A fresh list every call: TorchServe appends default dimensions to lists.
        metric.add_or_update(float(value), _values(spec, labels))


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
                    spec.name, spec.help, list(spec.labels), **kw
                )
            else:
                name = spec.name.removesuffix("_total")
                self._metrics[spec.name] = prom.Counter(name, spec.help, list(spec.labels), **kw)

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        """Observes the value (histogram) or increments by it (counter)."""
        child = self._metrics[spec.name].labels(*_values(spec, labels))
        if spec.kind == "histogram":
            child.observe(float(value))
        else:
            child.inc(float(value))


def record_batch(
    sink: MetricsSink,
    model: str,
    timings: Mapping[str, float],
    requests: list[tuple[str, float]],
) -> None:
    """Records one batch: stage and method timings, then each request's status and latency.

    Args:
        sink: where to record.
        model: the model name label.
        timings: seconds per stage; ``method.<id>`` keys go to the method histogram.
        requests: (status, seconds) per request; status is ``ok`` or an error type.
    """
    for key, seconds in timings.items():
        if key.startswith("method."):
            sink.record(METHOD_LATENCY, seconds, {"model": model, "method": key[7:]})
        else:
            sink.record(STAGE_LATENCY, seconds, {"model": model, "stage": key})
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

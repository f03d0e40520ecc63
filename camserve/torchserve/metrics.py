"""Records camserve's metrics through TorchServe's metrics cache (inside a handler)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from camserve.service.metrics import MetricSpec, label_values

__all__ = ["TorchServeMetrics"]


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
        metric.add_or_update(float(value), label_values(spec, labels))

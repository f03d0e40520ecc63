"""Metrics: one declaration, the TorchServe YAML in sync, both adapters."""

from __future__ import annotations

import logging
import warnings

import prometheus_client
import pytest
import yaml

with warnings.catch_warnings():  # TorchServe leaves files open (ts/version.txt, the YAML)
    warnings.simplefilter("ignore", ResourceWarning)
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.metrics.metric_type_enum import MetricTypes

from camserve.service.metrics import (
    LATENCY_BUCKETS,
    METHOD_LATENCY,
    METRICS,
    REQUEST_LATENCY,
    REQUESTS,
    PrometheusMetrics,
    record_batch,
    torchserve_model_metrics,
)
from camserve.torchserve.metrics import TorchServeMetrics
from camserve.torchserve.resources import metrics_yaml

YAML = metrics_yaml()


def test_every_metric_is_declared_in_the_torchserve_yaml() -> None:
    declared = yaml.safe_load(YAML.read_text())["model_metrics"]
    for kind, specs in torchserve_model_metrics().items():
        for spec in specs:
            assert spec in declared[kind], f"{spec['name']} missing from {YAML}"


def test_names_and_labels_follow_the_conventions() -> None:
    for spec in METRICS:
        assert spec.name.startswith("camserve_")
        assert spec.name.endswith("_seconds" if spec.kind == "histogram" else "_total")
        assert set(spec.labels) <= {"model", "method", "stage", "status", "device"}


def test_torchserve_adapter_emits_through_the_real_cache(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        cache = MetricsCacheYamlImpl(str(YAML))
    cache.initialize_cache()
    sink = TorchServeMetrics(cache, MetricTypes)
    with caplog.at_level(logging.INFO):
        record_batch(sink, "m", {"forward": 0.01, "method.gradcam": 0.002}, [("ok", 0.05)])
        sink.record(METHOD_LATENCY, 0.003, {"model": "m", "method": "layercam", "device": "cpu"})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert any(
        line.startswith(
            "[METRICS]camserve_method_latency_seconds.Seconds:0.002|#model:m,method:gradcam,device:cpu|#type:HISTOGRAM"
        )
        for line in lines
    ), lines
    assert any(
        "camserve_stage_latency_seconds.Seconds:0.01|#model:m,stage:forward,device:cpu" in x
        for x in lines
    )
    assert any(
        "camserve_requests_total.Count:1.0|#model:m,status:ok|#type:COUNTER" in x for x in lines
    )
    assert not any("Failed" in r.getMessage() for r in caplog.records)


def test_prometheus_adapter() -> None:
    registry = prometheus_client.CollectorRegistry()
    sink = PrometheusMetrics(registry)
    record_batch(
        sink,
        "m",
        {"backward": 0.02, "method.gradcam": 0.004},
        [("ok", 0.1), ("UnknownNameError", 0.1)],
    )
    sample = registry.get_sample_value
    gradcam = {"model": "m", "method": "gradcam", "device": "cpu"}
    assert sample("camserve_method_latency_seconds_count", gradcam) == 1
    backward = {"model": "m", "stage": "backward", "device": "cpu"}
    assert sample("camserve_stage_latency_seconds_sum", backward) == pytest.approx(0.02)
    assert sample("camserve_requests_total", {"model": "m", "status": "UnknownNameError"}) == 1
    with pytest.raises(KeyError, match="needs labels"):
        sink.record(REQUESTS, 1, {"model": "m"})


def test_latency_buckets_span_a_tenth_of_a_millisecond_to_a_minute() -> None:
    registry = prometheus_client.CollectorRegistry()
    sink = PrometheusMetrics(registry)
    sink.record(REQUEST_LATENCY, 0.00005, {"model": "m", "status": "ok"})
    sink.record(REQUEST_LATENCY, 45.0, {"model": "m", "status": "ok"})
    bucket = registry.get_sample_value
    labels = {"model": "m", "status": "ok"}
    assert bucket("camserve_request_latency_seconds_bucket", {**labels, "le": "0.0001"}) == 1
    assert bucket("camserve_request_latency_seconds_bucket", {**labels, "le": "30.0"}) == 1
    assert bucket("camserve_request_latency_seconds_bucket", {**labels, "le": "60.0"}) == 2
    assert LATENCY_BUCKETS[0] == 0.0001 and LATENCY_BUCKETS[-1] == 60.0

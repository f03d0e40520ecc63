"""The one TorchServe handler class camserve's handlers share; each handler file names its kind.

A thin adapter: requests go through :class:`camserve.serving.batch.BatchRunner`
(one forward and one backward per batch), per-item errors become per-item
statuses, and metrics go to TorchServe's metrics cache. The model is loaded from
the archive's extra files with :func:`camserve.serving.loading.load_task`. This
file travels in every archive as an extra file, beside the handler file (which
must define exactly one class of its own for TorchServe to find).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from ts.context import Context
from ts.metrics.metric_type_enum import MetricTypes

from camserve.serving.batch import BatchRunner
from camserve.serving.loading import load_task
from camserve.serving.metrics import TorchServeMetrics


class CamserveHandler:
    """Predictions plus maps for a model of one kind (``classifier``, ``captioner``, ``vqa``)."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.runner: BatchRunner | None = None
        self.initialized = False

    def initialize(self, context: Context) -> None:
        """Loads the model named like the archive, on the worker's GPU if it has one."""
        props = context.system_properties
        gpu = props.get("gpu_id")
        device = (
            torch.device(f"cuda:{gpu}")
            if gpu is not None and torch.cuda.is_available()
            else torch.device("cpu")
        )
        task = load_task(props["model_dir"], context.model_name, device, kind=self.kind)
        self.runner = BatchRunner(task, metrics=TorchServeMetrics(context.metrics, MetricTypes))
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[str]:
        """Answers a batch: one compact JSON string per request, errors per item."""
        if self.runner is None:
            raise RuntimeError("handler used before initialize()")
        raws = [(item, context.get_all_request_header(i)) for i, item in enumerate(data)]
        with torch.inference_mode(False), torch.enable_grad():
            results = self.runner.run(raws)
        for i, result in enumerate(results):
            context.set_response_content_type(i, "application/json")
            if not result.ok:
                context.set_response_status(result.status, result.message, i)
        return [r.body for r in results]

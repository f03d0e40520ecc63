"""The one TorchServe handler class camserve's handlers share; each handler file names its kind.

A thin adapter: TorchServe's requests go through the JSON codec
(:mod:`camserve.codecs.http`) into typed requests, the
:class:`~camserve.service.ExplainService` answers them (one forward and one
backward per compatible group), and the codec turns each outcome into its own
status and JSON body. The model's spec is the archive's ``model.toml`` (or, for
a model store used as the model folder, ``<model name>.toml``), served under
TorchServe's model name. This file travels in every archive as an extra file,
beside the handler file (which must define exactly one class of its own for
TorchServe to find).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from ts.context import Context
from ts.metrics.metric_type_enum import MetricTypes

from camserve.codecs.http import encode_error, encode_outcome, parse_request
from camserve.errors import CamserveError, InvalidRequestError
from camserve.models import SPEC_FILE, read_spec
from camserve.service import ExplainRequest, ExplainResult, ExplainService, load_settings
from camserve.service.metrics import record_batch
from camserve.torchserve.metrics import TorchServeMetrics


def spec_path(model_dir: Path, name: str) -> Path:
    """The model's spec in ``model_dir``: ``model.toml``, else ``<name>.toml``."""
    own = model_dir / SPEC_FILE
    return own if own.is_file() else model_dir / f"{name}.toml"


class CamserveHandler:
    """Predictions plus maps for a model of one kind (``classifier``, ``captioner``, ``vqa``)."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.service: ExplainService | None = None
        self.metrics: TorchServeMetrics | None = None
        self.name = ""
        self.initialized = False

    def initialize(self, context: Context) -> None:
        """Loads the archive's model spec and model, on the worker's GPU if it has one.

        Limits come from :func:`camserve.service.load_settings` (``CAMSERVE_*``
        variables and ``CAMSERVE_SETTINGS_FILE`` in TorchServe's environment).

        Raises:
            InvalidRequestError: a wrong spec, or a model of another kind.
        """
        props = context.system_properties
        gpu = props.get("gpu_id")
        device = (
            torch.device(f"cuda:{gpu}")
            if gpu is not None and torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.name = context.model_name
        spec = read_spec(spec_path(Path(props["model_dir"]), self.name))
        if spec.kind != self.kind:
            raise InvalidRequestError(f"model {spec.name!r} is a {spec.kind}, not a {self.kind}")
        spec = dataclasses.replace(spec, name=self.name)
        self.metrics = TorchServeMetrics(context.metrics, MetricTypes)
        self.service = ExplainService.from_specs(
            [spec], device=device, settings=load_settings(), metrics=self.metrics
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[str]:
        """Answers a batch: one compact JSON string per request, errors per request."""
        if self.service is None or self.metrics is None:
            raise RuntimeError("handler used before initialize()")
        answers: list[tuple[int, str, str] | None] = [None] * len(data)
        requests: list[ExplainRequest] = []
        positions: list[int] = []
        refused: list[tuple[str, float]] = []
        for i, item in enumerate(data):
            t0 = time.perf_counter()
            try:
                headers = context.get_all_request_header(i)
                requests.append(parse_request(item, headers, model=self.name))
                positions.append(i)
            except CamserveError as exc:
                answers[i] = encode_error(exc)
                refused.append((type(exc).__name__, time.perf_counter() - t0))
        if refused:
            record_batch(self.metrics, self.name, {}, refused)
        for i, outcome in zip(positions, self.service.run(requests), strict=True):
            if isinstance(outcome, ExplainResult):  # the batch TorchServe sent, refused ones too
                outcome = dataclasses.replace(outcome, batch_size=len(data))
            answers[i] = encode_outcome(outcome)
        bodies = []
        for i, answer in enumerate(answers):
            assert answer is not None
            status, message, body = answer
            context.set_response_content_type(i, "application/json")
            if status != 200:
                context.set_response_status(status, message, i)
            bodies.append(body)
        return bodies

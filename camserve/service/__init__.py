"""The transport-neutral explanation service: typed requests in, typed outcomes out.

:class:`ExplainRequest` (validating constructor), :class:`ExplainService`
(groups compatible requests into one engine call per model), the outcomes
:class:`ExplainResult` / :class:`ExplainError`, image decoding with caps
(:mod:`~camserve.service.images`), metric specs (:mod:`~camserve.service.metrics`)
and :class:`Settings`. Nothing here knows HTTP, JSON, gRPC or TorchServe.
"""

from camserve.service.outcomes import (
    ExplainError,
    ExplainResult,
    MapResult,
    Outcome,
    Prediction,
    TargetResult,
)
from camserve.service.request import ExplainRequest
from camserve.service.service import ExplainService, MethodDescription, ModelDescription
from camserve.service.settings import Settings, load_settings

__all__ = [
    "ExplainError",
    "ExplainRequest",
    "ExplainResult",
    "ExplainService",
    "MapResult",
    "MethodDescription",
    "ModelDescription",
    "Outcome",
    "Prediction",
    "Settings",
    "TargetResult",
    "load_settings",
]

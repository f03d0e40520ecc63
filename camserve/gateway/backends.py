"""What the gateway serves from: a small protocol that the in-process
:class:`~camserve.service.ExplainService` and a TorchServe backend both implement.

A backend answers a batch of requests of one model with one typed outcome per
request, in order; it never raises for one item's fault (that item gets its
:class:`~camserve.service.outcomes.ExplainError`). Raising means the whole
batch failed (``UnavailableError`` when the backend cannot be reached).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from camserve.service import ModelDescription
from camserve.service.outcomes import Outcome
from camserve.service.request import ExplainRequest

__all__ = ["Backend"]


class Backend(Protocol):
    """The gateway's view of an explanation service."""

    @property
    def device(self) -> str:
        """Where models run (the ``device`` label of the gateway's metrics)."""

    def run(self, requests: Sequence[ExplainRequest]) -> list[Outcome]:
        """One outcome per request, in order (blocking; called from a worker thread).

        Raises:
            UnavailableError: the backend cannot be reached (every item fails alike).
        """

    def model_names(self) -> list[str]:
        """The served model names."""

    def describe(self, name: str) -> ModelDescription:
        """A model's description (the service's :class:`~camserve.service.ModelDescription`).

        Raises:
            UnknownNameError: an unknown model (kind ``model``).
            UnavailableError: the backend cannot be reached.
        """

    def ready(self, name: str) -> bool:
        """Whether the model can answer now (the health service's per-model status)."""

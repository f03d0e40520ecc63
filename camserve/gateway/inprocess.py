"""The in-process backend: the :class:`~camserve.service.ExplainService` in the gateway's
own process (no Java, no TorchServe)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from camserve.service import ExplainService, ModelDescription, Settings
from camserve.service.outcomes import Outcome
from camserve.service.request import ExplainRequest

__all__ = ["InProcessBackend"]


class InProcessBackend:
    """Serves the models of an :class:`ExplainService`.

    Args:
        service: the service.
    """

    def __init__(self, service: ExplainService) -> None:
        self.service = service
        names = service.model_names()
        self.device = service.describe(names[0]).device if names else "cpu"

    @classmethod
    def load(
        cls,
        models: Iterable[str],
        store: str | Path,
        *,
        settings: Settings | None = None,
        registry: Any = None,
    ) -> InProcessBackend:
        """Loads models by name or spec file (see :func:`camserve.models.resolve`).

        Args:
            models: model names (in ``store`` or built in) or spec files.
            store: the model store folder.
            settings: the service's settings (default: from the environment).
            registry: a Prometheus registry for the service's stage and method
                metrics (the gateway's), or None for none.

        Raises:
            UnknownNameError: an unknown model name.
            InvalidRequestError: a wrong spec.
        """
        from camserve.models import resolve

        metrics = None
        if registry is not None:
            from camserve.service.metrics import PrometheusMetrics

            metrics = PrometheusMetrics(registry)
        specs = [resolve(m, store) for m in models]
        return cls(ExplainService.from_specs(specs, settings=settings, metrics=metrics))

    def run(self, requests: Sequence[ExplainRequest]) -> list[Outcome]:
        """The service's answers, one per request."""
        return self.service.run(requests)

    def model_names(self) -> list[str]:
        """The served model names."""
        return self.service.model_names()

    def describe(self, name: str) -> ModelDescription:
        """The model's description (UnknownNameError for an unknown name)."""
        return self.service.describe(name)

    def ready(self, name: str) -> bool:
        """Loaded models are always ready."""
        return name in self.service.model_names()

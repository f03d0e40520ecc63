"""What the gateway serves from: a small protocol that the in-process
:class:`~camserve.service.ExplainService` and a TorchServe backend both implement.

A backend answers a batch of requests of one model with one typed outcome per
request, in order; it never raises for one item's fault (that item gets its
:class:`~camserve.service.outcomes.ExplainError`). Raising means the whole
batch failed (``UnavailableError`` when the backend cannot be reached).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from camserve.service.outcomes import ModelKind, Outcome
from camserve.service.request import ExplainRequest

__all__ = ["Backend", "MethodDescription", "ModelDescription", "OptionDescription"]


@dataclass(frozen=True)
class OptionDescription:
    """One option of a method: its name, accepted types and allowed values (if a fixed set)."""

    name: str
    types: tuple[str, ...]
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class MethodDescription:
    """One method a model can be explained with.

    Attributes:
        id: the method id.
        resolution: ``layer`` or ``input``.
        cost: ``single_pass`` or ``rerun``.
        options: its options.
    """

    id: str
    resolution: str
    cost: str
    options: tuple[OptionDescription, ...] = ()


@dataclass(frozen=True)
class ModelDescription:
    """What a client needs to know to call a model.

    Attributes:
        name: the served name.
        kind: ``classifier``, ``captioner`` or ``vqa``.
        labels: class names (classifier) or answers (VQA).
        vocabulary: caption / question words.
        layers: module paths that can be explained; ``default_layer`` the default one.
        methods: the applicable methods.
        input_size: ``(C, H, W)`` of the model input.
        runtime: ``torch`` or ``onnx``.
        device: where it runs (``cpu``, ``cuda:0``), empty when unknown.
    """

    name: str
    kind: ModelKind
    labels: tuple[str, ...]
    vocabulary: tuple[str, ...]
    layers: tuple[str, ...]
    default_layer: str
    methods: tuple[MethodDescription, ...]
    input_size: tuple[int, int, int]
    runtime: str = "torch"
    device: str = ""


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
        """A model's description.

        Raises:
            UnknownNameError: an unknown model (kind ``model``).
            UnavailableError: the backend cannot be reached.
        """

    def ready(self, name: str) -> bool:
        """Whether the model can answer now (the health service's per-model status)."""

"""``ExplainService``: typed requests in, typed outcomes out, one engine call per group.

Requests for the same model that agree on the engine call (same layer, score,
kind of targets, per-method options, and cost class) share one forward and one
backward: the union of their methods is computed, their targets are padded to a
common count, and the results are sliced back per request. A request with a
re-running method (``MethodSpec.cost == "rerun"``: Ablation-CAM, Score-CAM,
occlusion, the reference methods and their guided products) only shares a call
with requests asking for exactly the same methods, so cheap requests never pay
for it. Every request gets its own outcome; one bad request never fails the
others (a group whose engine call fails is re-run request by request to find
the culprit).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from camserve.engine.layout import TokenGrid
from camserve.engine.methods import method_spec
from camserve.errors import (
    InvalidRequestError,
    UnknownNameError,
)
from camserve.models import LoadedModel, load_model
from camserve.models.spec import ModelSpec, layout_text
from camserve.service.batch import ModelBatch, internal_error
from camserve.service.images import ImageLimits, InputTransform
from camserve.service.metrics import MetricsSink, NullMetrics
from camserve.service.outcomes import ExplainError, ModelKind, Outcome
from camserve.service.request import ExplainRequest
from camserve.service.settings import Settings
from camserve.service.tasks import ClassifierTask, Task, TaskBase
from camserve.service.text_tasks import CaptionTask, VQATask

__all__ = ["ExplainService", "MethodDescription", "ModelDescription", "task_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodDescription:
    """One method a model can be explained with.

    Attributes:
        id: the method id.
        resolution: ``layer`` or ``input``.
        cost: ``single_pass`` or ``rerun``.
        options: option name -> the accepted type names.
    """

    id: str
    resolution: str
    cost: str
    options: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class ModelDescription:
    """What a caller needs to know to ask a model for explanations.

    Attributes:
        name: the model's name.
        kind: ``classifier``, ``captioner`` or ``vqa``.
        labels: class names (classifier) or answers (VQA).
        vocab: caption / question words (captioner, VQA).
        layer: the default layer.
        layers: every explainable layer (``named_modules()`` paths).
        methods: the methods with their options.
        input_size: ``(3, H, W)`` of the model input.
        mean, std: its per-channel normalisation.
        runtime: ``torch`` or ``onnx``.
        device: where it runs (``cpu``, ``cuda:0``).
        layout: how its layers' outputs are read as activations, in words
            (``auto``, ``channels_last``, ``tokens: 1 prefix token(s), grid 7 x 7``;
            see :mod:`camserve.engine.layout`).
    """

    name: str
    kind: ModelKind
    labels: tuple[str, ...]
    vocab: tuple[str, ...]
    layer: str
    layers: tuple[str, ...]
    methods: tuple[MethodDescription, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    runtime: str
    device: str
    layout: str = "auto"


def task_for(loaded: LoadedModel, settings: Settings | None = None) -> Task:
    """The service task of a loaded model (classifier, captioner or VQA).

    A model with another runtime than torch (``onnx``) is served through its
    :attr:`~camserve.models.LoadedModel.explainer_factory`.
    """
    task = _task_of(loaded, settings or Settings())
    if loaded.runtime != "torch" and isinstance(task, TaskBase):
        task.serve_with(loaded.runtime, loaded.explainer_factory, loaded.layers)
    return task


def _task_of(loaded: LoadedModel, settings: Settings) -> Task:
    spec = loaded.spec
    _, h, w = spec.input_size
    transform = InputTransform(size=(h, w), mean=spec.mean, std=spec.std)
    if spec.kind == "captioner":
        if loaded.generate is None or loaded.eos_id is None:
            raise InvalidRequestError(f"model {spec.name!r}: a captioner needs generate and <eos>")
        return CaptionTask(
            spec.name,
            loaded.model,
            loaded.generate,
            spec.vocab,
            loaded.eos_id,
            spec.layer,
            transform,
            loaded.device,
            pad_id=loaded.pad_id,
            layout=spec.layout,
        )
    if spec.kind == "vqa":
        if loaded.tokenize is None:
            raise InvalidRequestError(f"model {spec.name!r}: a VQA model needs a vocabulary")
        return VQATask(
            spec.name,
            loaded.model,
            spec.labels,
            loaded.tokenize,
            spec.layer,
            transform,
            loaded.device,
            pad_id=loaded.pad_id,
            predictions=settings.predictions,
            layout=spec.layout,
        )
    return ClassifierTask(
        spec.name,
        loaded.model,
        spec.labels,
        spec.layer,
        transform,
        loaded.device,
        predictions=settings.predictions,
        layout=spec.layout,
    )


def _layout_of(task: Task) -> str:
    layout = getattr(task, "layout", "auto")
    if isinstance(layout, str | TokenGrid):
        return layout_text(layout)
    return f"rearranged by {getattr(layout, '__name__', repr(layout))}"


class _Model:
    """One served model: its task, spec and the lock that serialises its engine calls."""

    def __init__(self, task: Task, spec: ModelSpec | None) -> None:
        self.task = task
        self.spec = spec
        self.lock = threading.Lock()


class ExplainService:
    """Explains typed requests with any of its models; thread-safe.

    Args:
        tasks: the served models' tasks by name.
        settings: limits (image caps, batch size).
        metrics: where stage, method and request metrics go.
        specs: the models' specs by name (for :meth:`describe`), if known.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        *,
        settings: Settings | None = None,
        metrics: MetricsSink | None = None,
        specs: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.metrics: MetricsSink = metrics or NullMetrics()
        self.limits = ImageLimits(self.settings.max_image_bytes, self.settings.max_image_pixels)
        self._models = {n: _Model(t, (specs or {}).get(n)) for n, t in tasks.items()}

    @classmethod
    def from_specs(
        cls,
        specs: Iterable[ModelSpec],
        *,
        device: torch.device | str | None = None,
        settings: Settings | None = None,
        metrics: MetricsSink | None = None,
    ) -> ExplainService:
        """Loads every spec's model on ``device`` (default: the settings' device).

        Raises:
            InvalidRequestError: a wrong spec (see :func:`camserve.models.load_model`),
                or two specs with one name.
        """
        settings = settings or Settings()
        dev = torch.device(device if device is not None else settings.torch_device())
        tasks: dict[str, Task] = {}
        by_name: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in tasks:
                raise InvalidRequestError(f"two models named {spec.name!r}")
            tasks[spec.name] = task_for(load_model(spec, dev), settings)
            by_name[spec.name] = spec
        return cls(tasks, settings=settings, metrics=metrics, specs=by_name)

    # --- models ----------------------------------------------------------------
    def model_names(self) -> list[str]:
        """The served models' names, sorted."""
        return sorted(self._models)

    def _model(self, name: str) -> _Model:
        m = self._models.get(name)
        if m is None:
            raise UnknownNameError("model", name, self._models)
        return m

    def describe(self, name: str) -> ModelDescription:
        """What model ``name`` is and how it can be explained.

        Raises:
            UnknownNameError: no such model.
        """
        m = self._model(name)
        task, spec = m.task, m.spec
        from camserve.engine.methods import list_methods

        methods = tuple(
            MethodDescription(
                id=s.id,
                resolution=s.resolution,
                cost=s.cost,
                options={k: tuple(t.__name__ for t in v.types) for k, v in s.options.items()},
            )
            for s in (
                method_spec(mid)
                for mid in (task.method_ids() if isinstance(task, TaskBase) else list_methods())
            )
        )
        _, h, w = (3, *task.transform.size)
        labels: tuple[str, ...] = ()
        vocab: tuple[str, ...] = ()
        if isinstance(task, ClassifierTask):
            labels = tuple(task.labels)
        elif isinstance(task, VQATask):
            labels = tuple(task.answers)
        if isinstance(task, CaptionTask):
            vocab = tuple(task.vocab)
        if spec is not None:
            vocab = vocab or spec.vocab
        return ModelDescription(
            name=name,
            kind=task.kind,
            labels=labels,
            vocab=vocab,
            layer=task.default_layer,
            layers=tuple(task.layers()),
            methods=methods,
            input_size=(3, h, w),
            mean=task.transform.mean,
            std=task.transform.std,
            runtime=task.runtime,
            device=str(task.runtime_device),
            layout=_layout_of(task),
        )

    # --- the batch ---------------------------------------------------------------
    def run(self, requests: Sequence[ExplainRequest]) -> list[Outcome]:
        """Answers every request: one outcome per request, in order.

        Requests for different models are answered model by model; within a
        model, compatible requests share engine calls of at most
        ``settings.max_batch_size`` requests. One engine call at a time runs
        per model.
        """
        outcomes: list[Outcome | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            if not isinstance(req, ExplainRequest):
                raise TypeError(f"requests[{i}] is a {type(req).__name__}, not an ExplainRequest")
            if req.model not in self._models:
                outcomes[i] = ExplainError(
                    req.request_id, req.model, UnknownNameError("model", req.model, self._models)
                )
                continue
            by_model.setdefault(req.model, []).append(i)
        for name, idx in by_model.items():
            answers = self._run_model(self._models[name], [requests[i] for i in idx])
            for i, outcome in zip(idx, answers, strict=True):
                outcomes[i] = outcome
        return [o if o is not None else internal_error(requests[i]) for i, o in enumerate(outcomes)]

    def _run_model(self, m: _Model, requests: Sequence[ExplainRequest]) -> list[Outcome]:
        batch = ModelBatch(m.task, self.settings, self.limits)
        batch.admit(requests)  # decoding needs no lock: other callers' engine calls go on
        with m.lock, torch.inference_mode(False), torch.enable_grad():
            return batch.compute(self.metrics)

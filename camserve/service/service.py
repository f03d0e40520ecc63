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

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from camserve.engine import Explanation
from camserve.engine.methods import method_spec
from camserve.errors import (
    CamserveError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelFailureError,
    UnknownNameError,
)
from camserve.models import LoadedModel, load_model
from camserve.models.spec import ModelSpec
from camserve.render import localization_box, overlay_png, scale_box
from camserve.service.images import ImageLimits, InputTransform, decode_image
from camserve.service.metrics import MetricsSink, NullMetrics, record_batch
from camserve.service.outcomes import ExplainError, ExplainResult, MapResult, ModelKind, Outcome
from camserve.service.request import ExplainRequest
from camserve.service.settings import Settings
from camserve.service.tasks import (
    CaptionTask,
    ClassifierTask,
    Item,
    Task,
    VQATask,
)

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


def task_for(loaded: LoadedModel, settings: Settings | None = None) -> Task:
    """The service task of a loaded model (classifier, captioner or VQA)."""
    settings = settings or Settings()
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
        )
    return ClassifierTask(
        spec.name,
        loaded.model,
        spec.labels,
        spec.layer,
        transform,
        loaded.device,
        predictions=settings.predictions,
    )


def _host(maps: torch.Tensor) -> np.ndarray:
    return maps.detach().to("cpu", torch.float32).contiguous().numpy()


def _non_finite(output: object) -> bool:
    if isinstance(output, torch.Tensor):
        return output.is_floating_point() and not bool(torch.isfinite(output).all())
    if isinstance(output, tuple | list):
        return any(_non_finite(o) for o in output)
    return False


@contextlib.contextmanager
def _watched(task: Task) -> Iterator[None]:
    """Turns the model's own failures into :class:`ModelFailureError` naming the model.

    The engine keeps NaN and inf out of its maps (they become zeros), so a model
    whose output is not finite would otherwise answer blank maps: a forward hook
    on the model's root module sees the raw output of every forward.
    """
    bad: list[bool] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        if not bad and _non_finite(output):
            bad.append(True)

    try:
        handle = task.model.register_forward_hook(hook)
    except (RuntimeError, AttributeError):  # a TorchScript module takes no Python hooks
        handle = None
    try:
        yield
    except CamserveError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ModelFailureError(f"{type(exc).__name__}: {exc}", model=task.name) from exc
    finally:
        if handle is not None:
            handle.remove()
    if bad:
        raise ModelFailureError("the model's output is not finite (NaN or inf)", model=task.name)


def _options_key(options: Mapping[str, Mapping[str, Any]]) -> Hashable:
    return tuple(
        sorted((m, tuple(sorted(o.items(), key=lambda kv: kv[0]))) for m, o in options.items())
    )


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
            for s in (method_spec(mid) for mid in list_methods())
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
            runtime=spec.runtime if spec is not None else "torch",
            device=str(task.device),
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
        return [o if o is not None else _internal(requests[i]) for i, o in enumerate(outcomes)]

    def _run_model(self, m: _Model, requests: Sequence[ExplainRequest]) -> list[Outcome]:
        with m.lock, torch.inference_mode(False), torch.enable_grad():
            return _Batch(m.task, self.settings, self.limits).run(requests, self.metrics)


def _internal(req: ExplainRequest) -> ExplainError:
    return ExplainError(
        req.request_id, req.model, InternalError("internal error while explaining this request")
    )


class _Batch:
    """One :meth:`ExplainService.run` for one model."""

    def __init__(self, task: Task, settings: Settings, limits: ImageLimits) -> None:
        self.task = task
        self.settings = settings
        self.limits = limits
        self.max_batch = settings.max_batch_size
        self.results: dict[int, ExplainResult] = {}
        self.errors: dict[int, CamserveError] = {}
        self.finished: dict[int, float] = {}
        self.timings: dict[str, float] = {}

    # --- per request -----------------------------------------------------------
    def _admit(self, req: ExplainRequest, started: float) -> Item:
        task = self.task
        if req.deadline is not None and time.monotonic() > req.deadline:
            raise DeadlineExceededError("the request's deadline passed before it was computed")
        limits = self.settings
        if len(req.methods) > limits.max_methods:
            raise InvalidRequestError(
                f"at most {limits.max_methods} methods per request, got {len(req.methods)}"
            )
        n_targets = max(len(req.class_ids) + len(req.labels), len(req.answers), req.k)
        if n_targets > limits.max_targets:
            raise InvalidRequestError(
                f"at most {limits.max_targets} targets per request, got {n_targets}"
            )
        layer = req.layer or task.default_layer
        if not req.predict_only:
            task.explainer(layer)  # unknown layer -> UnknownNameError for this request only
        h, w = task.transform.size
        if req.tensor is not None:
            shape = tuple(req.tensor.shape)
            if shape != (3, h, w):
                raise InvalidRequestError(f"tensor must have shape (3, {h}, {w}), got {shape}")
            x = torch.from_numpy(np.ascontiguousarray(req.tensor))
            resized = None
            size = (w, h)
        else:
            assert req.image is not None  # the request's constructor checked it
            image = decode_image(req.image, self.limits)
            resized = task.transform.resized(image)
            x = task.transform.normalize(resized)  # resized once, not twice
            size = image.size
        item = Item(req, x, resized, size, layer, started)
        task.prepare(item)
        return item

    def _key(self, item: Item) -> Hashable:
        req = item.request
        if req.predict_only:
            return ("predict", self.task.group_key(item))
        rerun = any(method_spec(m).cost == "rerun" for m in req.methods)
        return (
            item.layer,
            req.score,
            self.task.group_key(item),
            frozenset(req.methods) if rerun else None,
            _options_key(req.options),
        )

    def _fail(self, i: int, exc: CamserveError) -> None:
        self.errors[i] = exc
        self.finished[i] = time.perf_counter()

    def _add(self, t: Mapping[str, float]) -> None:
        for k, v in t.items():
            self.timings[k] = self.timings.get(k, 0.0) + v

    # --- per group -------------------------------------------------------------
    def _explain(self, items: Sequence[Item]) -> tuple[list[ExplainResult], dict[str, float]]:
        task = self.task
        layer = items[0].layer
        methods: list[str] = []
        for it in items:
            methods += [m for m in it.request.methods if m not in methods]
        with _watched(task):
            call = task.call(items)
            exp = task.explainer(layer).explain(
                call.inputs,
                methods=tuple(methods),
                targets=call.targets,
                score=call.score,
                options=items[0].request.options,
            )
        upsampled: dict[str, np.ndarray] = {}
        raws: dict[str, np.ndarray] = {}
        resolved: dict[str, str] = {}
        for m in methods:  # the engine adds the time to timings["upsample"]
            resolved[m], raw = _map_of(exp, m, layer)
            up = exp.upsampled(m, resolved[m])
            if not (bool(torch.isfinite(raw).all()) and bool(torch.isfinite(up).all())):
                raise ModelFailureError(f"non-finite {m} map", model=task.name)
            raws[m], upsampled[m] = _host(raw), _host(up)  # one host copy per method
        t0 = time.perf_counter()
        results: list[ExplainResult] = []
        for row, it in enumerate(items):
            head, targets = task.describe(exp, row, it)
            req = it.request
            in_size = (int(it.x.shape[-2]), int(it.x.shape[-1]))
            want_box = req.boxes or req.output == "box"
            done = []
            for target in targets:
                maps: dict[str, MapResult] = {}
                for m in req.methods:
                    norm = upsampled[m][row, target.column]
                    box = None
                    if want_box:
                        box = scale_box(
                            localization_box(norm, req.threshold), in_size, it.image_size
                        )
                    data = None
                    png = None
                    if req.output == "raw":
                        data = raws[m][row, target.column]
                    elif req.output == "normalized":
                        data = norm
                    elif req.output == "png":
                        if it.resized is None:
                            raise InvalidRequestError("output 'png' needs an image, not a tensor")
                        png = overlay_png(norm, it.resized)
                    maps[m] = MapResult(m, resolved[m], data=data, png=png, box=box)
                done.append(_with_maps(target.result, maps))
            results.append(self._result(it, call.score, head, tuple(done)))
        timings = {k: float(v) for k, v in exp.timings.items() if k != "total"}
        timings.update(call.timings)
        timings["encode"] = time.perf_counter() - t0
        return results, timings

    def _predict(self, items: Sequence[Item]) -> tuple[list[ExplainResult], dict[str, float]]:
        with _watched(self.task):
            heads, timings = self.task.predict(items)
        out = []
        for it, head in zip(items, heads, strict=True):
            out.append(self._result(it, it.request.score, head, ()))
        return out, timings

    def _result(
        self, it: Item, score: str, head: Mapping[str, Any], targets: tuple[Any, ...]
    ) -> ExplainResult:
        fields = dict(head)
        fields.setdefault("score", score)
        return ExplainResult(
            request_id=it.request.request_id,
            model=self.task.name,
            kind=self.task.kind,
            layer=it.layer,
            output=it.request.output,
            image_size=it.image_size,
            input_size=(int(it.x.shape[-2]), int(it.x.shape[-1])),
            targets=targets,
            **fields,
        )

    def _run_group(self, idx: list[int], items: Mapping[int, Item]) -> None:
        group = [items[i] for i in idx]
        if any(
            it.request.deadline is not None and time.monotonic() > it.request.deadline
            for it in group
        ):
            live = []
            for i in idx:
                d = items[i].request.deadline
                if d is not None and time.monotonic() > d:
                    self._fail(
                        i,
                        DeadlineExceededError(
                            "the request's deadline passed before it was computed"
                        ),
                    )
                else:
                    live.append(i)
            if live:
                self._run_group(live, items)
            return
        work: Callable[[Sequence[Item]], tuple[list[ExplainResult], dict[str, float]]]
        work = self._predict if group[0].request.predict_only else self._explain
        try:
            out, t = work(group)
        except CamserveError as exc:
            if len(idx) > 1:  # find the request(s) at fault; the others still answer
                for i in idx:
                    self._run_group([i], items)
                return
            self._fail(idx[0], exc)
            return
        except Exception:
            log.exception("explaining a group of %d failed", len(idx))
            for i in idx:
                self._fail(i, InternalError("internal error while explaining this request"))
            return
        self._add(t)
        done = time.perf_counter()
        for i, res in zip(idx, out, strict=True):
            self.results[i] = res
            self.finished[i] = done

    def run(self, requests: Sequence[ExplainRequest], metrics: MetricsSink) -> list[Outcome]:
        start = time.perf_counter()
        groups: dict[Hashable, list[int]] = {}
        items: dict[int, Item] = {}
        started: dict[int, float] = {}
        t0 = time.perf_counter()
        for i, req in enumerate(requests):
            started[i] = time.perf_counter()
            try:
                items[i] = self._admit(req, started[i])
                groups.setdefault(self._key(items[i]), []).append(i)
            except CamserveError as exc:
                self._fail(i, exc)
            except Exception:
                log.exception("admitting request %d of %d failed", i, len(requests))
                self._fail(i, InternalError("internal error while explaining this request"))
        self.timings["decode"] = time.perf_counter() - t0
        for idx in groups.values():
            for s in range(0, len(idx), self.max_batch):
                self._run_group(idx[s : s + self.max_batch], items)

        total = time.perf_counter() - start
        batch_timings = dict(self.timings)
        outcomes: list[Outcome] = []
        statuses: list[tuple[str, float]] = []
        for i, req in enumerate(requests):
            res = self.results.get(i)
            latency = self.finished.get(i, time.perf_counter()) - started[i]
            if res is not None:
                outcomes.append(_replace(res, timings=batch_timings, batch_size=len(requests)))
                statuses.append(("ok", latency))
            else:
                err = self.errors.get(i) or InternalError("internal error while explaining")
                outcomes.append(ExplainError(req.request_id, req.model, err))
                statuses.append((type(err).__name__, latency))
        batch_timings_total = {**batch_timings, "total": total}
        record_batch(
            metrics, self.task.name, batch_timings_total, statuses, device=str(self.task.device)
        )
        return outcomes


def _replace(res: ExplainResult, **changes: Any) -> ExplainResult:
    import dataclasses

    return dataclasses.replace(res, **changes)


def _with_maps(target: Any, maps: Mapping[str, MapResult]) -> Any:
    import dataclasses

    return dataclasses.replace(target, maps=maps)


def _map_of(exp: Explanation, method: str, layer: str) -> tuple[str, torch.Tensor]:
    if method in exp.maps.get(layer, {}):
        return layer, exp.maps[layer][method]
    if method in exp.maps.get("input", {}):
        return "input", exp.maps["input"][method]
    raise ModelFailureError(f"the engine returned no {method!r} map at layer {layer!r}")

"""One :meth:`ExplainService.run` for one model: admission, grouping, engine calls, results.

Requests that agree on the engine call (same layer, score, kind of targets,
per-method options, and, when any of their methods re-runs the network
(``MethodSpec.cost == "rerun"``), the same methods) share one forward and one
backward. Every request gets its own outcome; when the model's output is not
finite for some images of a group, those requests get a
:class:`~camserve.errors.ModelFailureError` naming the model and the rest of
the group is re-run; a group whose engine call fails otherwise is re-run
request by request to find the culprit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from camserve.engine import Explanation
from camserve.engine.methods import method_spec
from camserve.engine.outputs import NonFiniteOutputError
from camserve.errors import (
    CamserveError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelFailureError,
)
from camserve.render import Box, localization_boxes, overlay_png, scale_box
from camserve.service.images import ImageLimits, decode_image
from camserve.service.metrics import MetricsSink, record_batch
from camserve.service.outcomes import ExplainError, ExplainResult, MapResult, Outcome
from camserve.service.request import ExplainRequest
from camserve.service.settings import Settings
from camserve.service.tasks import Item, Task

__all__ = ["ModelBatch", "internal_error"]

log = logging.getLogger(__name__)


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

    The engine refuses a non-finite model output or score with
    :class:`NonFiniteOutputError` naming the images of the call at fault (kept,
    so the others of a group can still be answered); a forward hook on the
    model's root module sees the raw output of every forward as well, so a
    non-finite output is never answered with a blank map.
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
    except NonFiniteOutputError as exc:  # the engine's check: keep the rows at fault
        err = NonFiniteOutputError(str(exc), exc.images)
        err.model = task.name
        raise err from exc
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


def internal_error(req: ExplainRequest) -> ExplainError:
    """The outcome of a request that failed for no reason of its own (a bug)."""
    return ExplainError(
        req.request_id, req.model, InternalError("internal error while explaining this request")
    )


class ModelBatch:
    """One :meth:`ExplainService.run` for one model (use once): :meth:`admit`, then
    :meth:`compute` under the model's lock.

    Args:
        task: the model's task.
        settings: limits and the batch size.
        limits: the image caps.
    """

    def __init__(self, task: Task, settings: Settings, limits: ImageLimits) -> None:
        self.task = task
        self.settings = settings
        self.limits = limits
        self.max_batch = settings.max_batch_size
        self.results: dict[int, ExplainResult] = {}
        self.errors: dict[int, CamserveError] = {}
        self.finished: dict[int, float] = {}
        self.timings: dict[str, float] = {}
        self._start = 0.0
        self._requests: list[ExplainRequest] = []
        self._groups: dict[Hashable, list[int]] = {}
        self._items: dict[int, Item] = {}
        self._started: dict[int, float] = {}

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
            if req.output == "png":
                raise InvalidRequestError("output 'png' overlays an image: give image, not tensor")
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

    def _non_finite(self) -> ModelFailureError:
        message = "the model's output is not finite (NaN or inf)"
        return ModelFailureError(message, model=self.task.name)

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
            up = exp.upsampled(m, resolved[m])  # finite: the engine's maps never hold NaN/inf
            raws[m], upsampled[m] = _host(raw), _host(up)  # one host copy per method
        t0 = time.perf_counter()
        described = [task.describe(exp, row, it) for row, it in enumerate(items)]
        boxes: dict[tuple[int, int, str], Box] = {}
        for m in methods:  # one labelling pass per method for every map that wants a box
            keys = [
                (row, target.column)
                for row, it in enumerate(items)
                if (it.request.boxes or it.request.output == "box") and m in it.request.methods
                for target in described[row][1]
            ]
            if not keys:
                continue
            rows_, cols_ = zip(*keys, strict=True)
            found = localization_boxes(
                upsampled[m][list(rows_), list(cols_)],
                [items[r].request.threshold for r in rows_],
            )
            for (row, col), found_box in zip(keys, found, strict=True):
                it = items[row]
                in_size = (int(it.x.shape[-2]), int(it.x.shape[-1]))
                boxes[(row, col, m)] = scale_box(found_box, in_size, it.image_size)
        results: list[ExplainResult] = []
        for row, it in enumerate(items):
            head, targets = described[row]
            req = it.request
            done = []
            for target in targets:
                maps: dict[str, MapResult] = {}
                for m in req.methods:
                    norm = upsampled[m][row, target.column]
                    data = None
                    png = None
                    if req.output == "raw":
                        data = raws[m][row, target.column]
                    elif req.output == "normalized":
                        data = norm
                    elif req.output == "png":
                        assert it.resized is not None  # admitted with an image
                        png = overlay_png(norm, it.resized)
                    box = boxes.get((row, target.column, m))
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
        except NonFiniteOutputError as exc:
            rows = sorted(set(exc.images))
            if 0 < len(rows) < len(idx) and rows[0] >= 0 and rows[-1] < len(idx):
                # the images the engine names fail; the rest is re-run (and so re-checked).
                # When every image is named (e.g. a non-finite output that is not
                # batch-first), each is re-run alone below to find the ones at fault.
                for r in rows:
                    self._fail(idx[r], self._non_finite())
                rest = [i for r, i in enumerate(idx) if r not in set(rows)]
                if rest:
                    self._run_group(rest, items)
                return
            if len(idx) > 1:
                for i in idx:
                    self._run_group([i], items)
                return
            self._fail(idx[0], self._non_finite())
            return
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

    def admit(self, requests: Sequence[ExplainRequest]) -> None:
        """Decodes and checks every request and groups them (no engine call, no model lock).

        A request that fails here gets its error now; :meth:`compute` answers it.
        """
        self._start = time.perf_counter()
        self._requests = list(requests)
        for i, req in enumerate(requests):
            self._started[i] = time.perf_counter()
            try:
                self._items[i] = self._admit(req, self._started[i])
                self._groups.setdefault(self._key(self._items[i]), []).append(i)
            except CamserveError as exc:
                self._fail(i, exc)
            except Exception:
                log.exception("admitting request %d of %d failed", i, len(requests))
                self._fail(i, InternalError("internal error while explaining this request"))
        self.timings["decode"] = time.perf_counter() - self._start

    def compute(self, metrics: MetricsSink) -> list[Outcome]:
        """The engine calls of the admitted requests; one outcome per request, in order.

        The caller holds the model's lock (one engine call at a time per model).
        """
        for idx in self._groups.values():
            for s in range(0, len(idx), self.max_batch):
                self._run_group(idx[s : s + self.max_batch], self._items)

        requests = self._requests
        total = time.perf_counter() - self._start
        batch_timings = dict(self.timings)
        outcomes: list[Outcome] = []
        statuses: list[tuple[str, float]] = []
        for i, req in enumerate(requests):
            res = self.results.get(i)
            latency = self.finished.get(i, time.perf_counter()) - self._started[i]
            if res is not None:
                outcomes.append(_replace(res, timings=batch_timings, batch_size=len(requests)))
                statuses.append(("ok", latency))
            else:
                err = self.errors.get(i) or InternalError("internal error while explaining")
                outcomes.append(ExplainError(req.request_id, req.model, err))
                statuses.append((type(err).__name__, latency))
        batch_timings_total = {**batch_timings, "total": total}
        device = str(self.task.runtime_device)
        record_batch(metrics, self.task.name, batch_timings_total, statuses, device=device)
        return outcomes


def _replace(res: ExplainResult, **changes: Any) -> ExplainResult:
    return dataclasses.replace(res, **changes)


def _with_maps(target: Any, maps: Mapping[str, MapResult]) -> Any:
    return dataclasses.replace(target, maps=maps)


def _map_of(exp: Explanation, method: str, layer: str) -> tuple[str, torch.Tensor]:
    if method in exp.maps.get(layer, {}):
        return layer, exp.maps[layer][method]
    if method in exp.maps.get("input", {}):
        return "input", exp.maps["input"][method]
    raise ModelFailureError(f"the engine returned no {method!r} map at layer {layer!r}")

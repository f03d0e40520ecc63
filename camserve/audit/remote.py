"""A :class:`~camserve.audit.scorer.Scorer` that audits a running camserve gateway.

Maps and predictions come from the service: images go out as float32 model
inputs (normalised with the mean and std the service describes, so nothing is
quantised), maps come back ``raw`` and are normalised and upsampled here with
the engine's own functions, and the perturbed images of the metrics are
re-scored through ``predict_only`` requests. Requests go out ``batch`` items
per ``ExplainBatch`` call, at most ``concurrency`` calls at a time; items the
gateway refuses because its queue is full (RESOURCE_EXHAUSTED, which it
answers per item) go again after a growing pause, until the call's timeout.
The auditor needs only the endpoint.

Limits: the service answers a prediction with its top classes only (at most
20), so a class outside them gets probability 0 (a lower bound, which matters
only for models with more than 20 classes); Grad-CAM++'s alpha statistics are
not served, so the ``alpha`` metric is empty for remote audits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

from camserve.audit.scorer import Explained
from camserve.client import Client
from camserve.engine.maps import normalize, upsample
from camserve.errors import CamserveError, InvalidRequestError, OverloadedError
from camserve.service.outcomes import ExplainError, ExplainResult, Outcome
from camserve.service.request import ExplainRequest
from camserve.service.settings import DEFAULT_MAX_TARGETS

__all__ = ["RemoteScorer"]

F32 = NDArray[np.float32]


def _overloaded(outcome: Outcome | None) -> bool:
    return isinstance(outcome, ExplainError) and isinstance(outcome.error, OverloadedError)


class RemoteScorer:
    """The model ``model`` behind the gateway at ``target`` (``host:port``).

    Args:
        target: the gateway's address.
        model: the served model name.
        token: bearer token, if the gateway wants one.
        batch: items per ``ExplainBatch`` call.
        concurrency: calls in flight at once.
        timeout: deadline of each call, seconds; also how long items refused
            as overloaded are sent again.

    Raises:
        InvalidRequestError: a model that is not a classifier.
        CamserveError: the gateway's answer to ``DescribeModel`` (unknown model,
            unavailable, ...).
    """

    def __init__(self, target: str, model: str, token: str | None = None, batch: int = 32,
                 concurrency: int = 4, timeout: float = 120.0) -> None:
        self.client = Client(target, token=token, timeout=timeout)
        desc = self.client.describe(model)
        if desc.kind != "classifier":
            raise InvalidRequestError(f"model {model!r} is a {desc.kind}; audits need a classifier")
        self.model = model
        self.labels = tuple(desc.labels)
        self.input_size = (int(desc.input_size[1]), int(desc.input_size[2]))
        self.layer = desc.layer
        self._mean = np.asarray(desc.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(desc.std, dtype=np.float32).reshape(3, 1, 1)
        self.digest = f"remote:{target}/{model}"
        self.batch = batch
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def close(self) -> None:
        """Closes the connection and the request threads."""
        self.pool.shutdown()
        self.client.close()

    def _tensor(self, pixels: NDArray[np.floating[Any]]) -> F32:
        """``(3, H, W)`` pixels in ``[0, 1]`` as the model's normalised float32 input."""
        return np.ascontiguousarray((np.asarray(pixels, np.float32) - self._mean) / self._std)

    def _send(self, requests: Sequence[ExplainRequest]) -> list[ExplainResult]:
        parts = [requests[i : i + self.batch] for i in range(0, len(requests), self.batch)]
        out: list[ExplainResult] = []
        for outcomes in self.pool.map(self._send_part, parts):
            for o in outcomes:
                if isinstance(o, ExplainError):
                    raise o.error
                out.append(o)
        return out

    def _send_part(self, part: Sequence[ExplainRequest]) -> list[Outcome]:
        """One ``ExplainBatch`` call; the items refused as overloaded are sent again
        (after 0.05 s, then doubling up to 2 s, until ``timeout``), the last answers kept."""
        outcomes: list[Outcome | None] = [None] * len(part)

        def send() -> bool:
            todo = [i for i, o in enumerate(outcomes) if o is None or _overloaded(o)]
            for i, o in zip(todo, self.client.explain_batch([part[i] for i in todo]), strict=True):
                outcomes[i] = o
            return any(_overloaded(outcomes[i]) for i in todo)

        Retrying(
            retry=retry_if_result(bool),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self.timeout),
            retry_error_callback=lambda _: True,  # out of time: the overloaded errors stand
        )(send)
        return [o for o in outcomes if o is not None]  # every item has its answer

    def predict(self, pixels: F32) -> F32:
        """Class probabilities ``(B, C)`` through ``predict_only`` requests."""
        k = min(len(self.labels), DEFAULT_MAX_TARGETS)
        reqs = [ExplainRequest(self.model, tensor=self._tensor(p), top_k=k, predict_only=True)
                for p in pixels]
        probs = np.zeros((len(reqs), len(self.labels)), dtype=np.float32)
        for i, res in enumerate(self._send(reqs)):
            for pred in res.predictions:
                probs[i, pred.id] = pred.probability
        return probs

    def explain(
        self,
        pixels: F32,
        methods: Sequence[str],
        class_ids: NDArray[np.int64],
        options: Mapping[str, Mapping[str, Any]],
        alpha_stats: bool = False,
        sensitivity: bool = False,
    ) -> Explained:
        """Raw maps of ``class_ids`` from the service, normalised and upsampled here.

        ``sensitivity`` is accepted and ignored: the service returns maps, not
        channel weights or ablated scores, so a remote audit has no sensitivity rows.
        """
        reqs = [
            ExplainRequest(self.model, tensor=self._tensor(p), methods=tuple(methods),
                           class_ids=tuple(int(c) for c in ids), output="raw", boxes=False,
                           options={m: dict(o) for m, o in options.items()})
            for p, ids in zip(pixels, class_ids, strict=True)
        ]
        results = self._send(reqs)
        n, k = class_ids.shape
        h, w = self.input_size
        maps = {m: np.zeros((n, k, h, w), np.float32) for m in methods}
        sums = {m: np.zeros((n, k), np.float32) for m in methods}
        peaks = {m: np.zeros((n, k), np.float32) for m in methods}
        scores = np.zeros((n, k), np.float32)
        for i, res in enumerate(results):
            by_id = {t.id: t for t in res.targets}
            for j, c in enumerate(class_ids[i].tolist()):
                t = by_id.get(int(c))
                if t is None:
                    raise CamserveError(f"the service did not explain class {c} of image {i}")
                scores[i, j] = t.score
                for m in methods:
                    data = t.maps[m].data
                    if data is None:
                        raise CamserveError(f"the service sent no raw map for {m}")
                    raw = torch.from_numpy(np.asarray(data, dtype=np.float32))
                    sums[m][i, j] = float(raw.sum())
                    peaks[m][i, j] = float(raw.max())
                    maps[m][i, j] = upsample(normalize(raw), (h, w)).numpy()
        return Explained(maps, sums, peaks, scores, [])

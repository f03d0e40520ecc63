"""Dynamic batching in front of a backend: per-model bounded queues, deadlines,
cancellation and back-pressure (asyncio; the backend runs in a worker thread).

Each model has one queue and one worker thread. The worker takes up to
``max_batch_size`` items and hands them to the backend in one call; while a
call runs, new items queue up and form the next batch (continuous batching).
``max_batch_delay`` > 0 also lets the first item of a batch wait that long for
more. Items keep their own options: the backend groups what can share an
engine call and answers each item separately.

- An item whose deadline has passed when its batch forms is not computed: it
  gets :class:`~camserve.errors.DeadlineExceededError`.
- A caller that goes away cancels its future; the worker drops cancelled items.
- A full queue refuses at once with :class:`~camserve.errors.OverloadedError`
  (RESOURCE_EXHAUSTED): memory stays bounded by the queue sizes.
- :meth:`Dispatcher.close` answers queued items with ``UnavailableError`` and
  lets the batches in flight finish within a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from camserve.errors import (
    CamserveError,
    DeadlineExceededError,
    InternalError,
    OverloadedError,
    UnavailableError,
    UnknownNameError,
)
from camserve.gateway.metrics import GatewayMetrics
from camserve.service.outcomes import ExplainError, Outcome
from camserve.service.request import ExplainRequest

__all__ = ["BatchPolicy", "Dispatcher", "ModelQueue", "Ticket"]

log = logging.getLogger(__name__)

RunFn = Callable[[Sequence[ExplainRequest]], list[Outcome]]


@dataclass(frozen=True)
class BatchPolicy:
    """How items are grouped and queued (see :class:`~camserve.gateway.settings.GatewaySettings`).

    Attributes:
        max_batch_size: most items per backend call (1: no batching).
        max_batch_delay_s: how long a batch's first item may wait for more (seconds).
        max_queue_size: most items queued per model.
    """

    max_batch_size: int = 16
    max_batch_delay_s: float = 0.0
    max_queue_size: int = 64


@dataclass(eq=False)
class Ticket:
    """One queued item: its request, the future of its outcome, and its queue time.

    Attributes:
        request: the request.
        future: resolves to the item's outcome; cancel it to drop the item.
        enqueued: ``time.monotonic()`` when it was queued.
        queue_s: seconds it waited before its batch started (set then).
    """

    request: ExplainRequest
    future: asyncio.Future[Outcome]
    enqueued: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0


class ModelQueue:
    """The queue and worker of one model.

    Args:
        model: the model name.
        run: the backend's ``run`` (blocking; called in this queue's thread).
        policy: batch size, delay and queue size.
        metrics: where batch sizes and queue times go (or None).
    """

    def __init__(
        self, model: str, run: RunFn, policy: BatchPolicy, metrics: GatewayMetrics | None = None
    ) -> None:
        self.model = model
        self.policy = policy
        self._run_fn = run
        self._metrics = metrics
        self._items: deque[Ticket] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"camserve-{model}")
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self.batches = 0
        """Backend calls made so far."""

    def __len__(self) -> int:
        return len(self._items)

    def submit(self, request: ExplainRequest) -> Ticket:
        """Queues an item.

        Raises:
            OverloadedError: the queue is full (cancelled items are purged first).
            UnavailableError: the queue is closed (shutting down).
        """
        if self._closed:
            raise UnavailableError("the gateway is shutting down; retry on another server")
        if len(self._items) >= self.policy.max_queue_size:
            self._items = deque(t for t in self._items if not t.future.done())
            if len(self._items) >= self.policy.max_queue_size:
                raise OverloadedError(
                    f"model {self.model!r} has {len(self._items)} items queued "
                    f"(max_queue_size {self.policy.max_queue_size}); retry later"
                )
        ticket = Ticket(request, asyncio.get_running_loop().create_future())
        self._items.append(ticket)
        self._wakeup.set()
        return ticket

    async def _loop(self) -> None:
        while True:
            if not self._items:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill()
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _fill(self) -> None:
        """Waits up to the batch delay after the first item for the batch to fill."""
        delay = self.policy.max_batch_delay_s
        if delay <= 0:
            return
        until = self._items[0].enqueued + delay
        while len(self._items) < self.policy.max_batch_size and not self._closed:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[Ticket]:
        now = time.monotonic()
        batch: list[Ticket] = []
        while self._items and len(batch) < self.policy.max_batch_size:
            ticket = self._items.popleft()
            if ticket.future.done():  # its caller went away
                continue
            deadline = ticket.request.deadline
            if deadline is not None and deadline <= now:
                late = now - deadline
                self._answer(
                    ticket,
                    DeadlineExceededError(
                        f"the deadline passed {late * 1000:.1f} ms before the item's batch "
                        f"started (it waited {(now - ticket.enqueued) * 1000:.1f} ms in "
                        f"model {self.model!r}'s queue); it was not computed"
                    ),
                )
                continue
            ticket.queue_s = now - ticket.enqueued
            batch.append(ticket)
        return batch

    def _answer(self, ticket: Ticket, outcome: Outcome | CamserveError) -> None:
        if isinstance(outcome, CamserveError):
            outcome = ExplainError(ticket.request.request_id, self.model, outcome)
        if not ticket.future.done():
            ticket.future.set_result(outcome)

    async def _run(self, batch: list[Ticket]) -> None:
        if self._metrics is not None:
            self._metrics.batch_started(self.model, len(batch), [t.queue_s for t in batch])
        self.batches += 1
        requests = [t.request for t in batch]
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._run_fn, requests)
            if len(outcomes) != len(batch):
                raise InternalError(
                    f"the backend answered {len(outcomes)} outcomes for {len(batch)} items"
                )
        except CamserveError as exc:
            for t in batch:
                self._answer(t, exc)
            return
        except Exception:
            log.exception("model %r: a batch of %d failed", self.model, len(batch))
            for t in batch:
                self._answer(t, InternalError("internal error while explaining this item"))
            return
        for t, outcome in zip(batch, outcomes, strict=True):
            self._answer(t, outcome)

    async def close(self, grace: float) -> None:
        """Answers queued items UNAVAILABLE; the batch in flight may finish within ``grace``."""
        self._closed = True
        while self._items:
            self._answer(
                self._items.popleft(),
                UnavailableError("the gateway is shutting down; the item was not computed"),
            )
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            log.warning(
                "model %r: the batch in flight did not finish within %.1f s", self.model, grace
            )
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class Dispatcher:
    """Routes items to their model's queue (created on first use).

    Args:
        run: the backend's ``run``.
        models: returns the served model names (called when an unknown name comes).
        policy: batching and queueing policy.
        metrics: the gateway's metrics, or None.
    """

    def __init__(
        self,
        run: RunFn,
        models: Callable[[], Sequence[str]],
        policy: BatchPolicy,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._run = run
        self._models = models
        self._known: frozenset[str] = frozenset()
        self.policy = policy
        self._metrics = metrics
        self.queues: dict[str, ModelQueue] = {}
        self._closed = False

    def refresh(self) -> frozenset[str]:
        """Re-reads the served model names (blocking for remote backends)."""
        self._known = frozenset(self._models())
        return self._known

    @property
    def names(self) -> frozenset[str]:
        """The served model names at the last refresh."""
        return self._known

    def known(self, model: str) -> bool:
        """Whether ``model`` was served at the last refresh."""
        return model in self._known

    def submit(self, request: ExplainRequest) -> Ticket:
        """Queues an item for its model.

        Raises:
            UnknownNameError: an unknown model (kind ``model``: NOT_FOUND).
            OverloadedError: the model's queue is full.
            UnavailableError: shutting down.
        """
        if self._closed:
            raise UnavailableError("the gateway is shutting down; retry on another server")
        if request.model not in self._known:
            raise UnknownNameError("model", request.model, self._known)
        queue = self.queues.get(request.model)
        if queue is None:
            queue = ModelQueue(request.model, self._run, self.policy, self._metrics)
            self.queues[request.model] = queue
        return queue.submit(request)

    async def close(self, grace: float) -> None:
        """Closes every queue (see :meth:`ModelQueue.close`), concurrently."""
        self._closed = True
        await asyncio.gather(*(q.close(grace) for q in self.queues.values()))

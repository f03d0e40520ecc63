"""The ``camserve.v1.ExplanationService`` servicer: protobuf <-> typed requests and outcomes.

It converts, queues each item with the :class:`~camserve.gateway.batcher.Dispatcher`,
awaits its outcome and maps errors to status codes with the one table in
:mod:`camserve.gateway.status`; nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from camserve.errors import CamserveError, InvalidRequestError, UnavailableError, UnknownNameError
from camserve.gateway.backends import Backend
from camserve.gateway.batcher import Dispatcher
from camserve.gateway.convert import model_info_of, request_from_proto, response_of
from camserve.gateway.metrics import GatewayMetrics
from camserve.gateway.proto import pb, pb_grpc
from camserve.gateway.status import code_of, status_of
from camserve.service import ModelDescription
from camserve.service.outcomes import ExplainError, ExplainResult, Outcome

__all__ = ["ExplanationServicer"]


class ExplanationServicer(pb_grpc.ExplanationServiceServicer):
    """Serves the API from a backend through a dispatcher.

    Args:
        backend: the backend (for model names and descriptions).
        dispatcher: queues items per model.
        metrics: the gateway's metrics.
        max_batch_items: most items of one ExplainBatch call, and most items of one
            ExplainStream in progress at a time.
    """

    def __init__(
        self,
        backend: Backend,
        dispatcher: Dispatcher,
        metrics: GatewayMetrics,
        max_batch_items: int = 64,
    ) -> None:
        self.backend = backend
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.max_batch_items = max_batch_items
        self._kinds: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers
    async def _describe(self, name: str) -> ModelDescription:
        try:
            return await asyncio.to_thread(self.backend.describe, name)
        except CamserveError:
            raise
        except Exception as exc:  # a remote backend that cannot be reached
            raise UnavailableError(f"the backend did not answer: {exc}") from exc

    async def _kind(self, model: str) -> str:
        kind = self._kinds.get(model)
        if kind is None:
            try:
                kind = (await self._describe(model)).kind
            except CamserveError:
                return ""
            self._kinds[model] = kind
        return kind

    async def _known(self, model: str) -> bool:
        if self.dispatcher.known(model):
            return True
        try:  # a model added since the last look
            await asyncio.to_thread(self.dispatcher.refresh)
        except Exception as exc:
            raise UnavailableError(f"the backend did not answer: {exc}") from exc
        return self.dispatcher.known(model)

    async def _one(
        self, msg: pb.ExplainRequest, context: grpc.aio.ServicerContext, method: str
    ) -> tuple[Outcome, float]:
        """(outcome, seconds queued) of one item; errors become ExplainError outcomes."""
        start = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else start + remaining
        known = False
        queued = 0.0
        try:
            if not msg.model:
                raise InvalidRequestError("model is required, got ''")
            known = await self._known(msg.model)
            if not known:
                raise UnknownNameError("model", msg.model, self.dispatcher.names)
            self.metrics.enter(msg.model)
            try:
                ticket = self.dispatcher.submit(request_from_proto(msg, deadline))
                outcome: Outcome = await ticket.future
                queued = ticket.queue_s
            finally:
                self.metrics.leave(msg.model)
        except CamserveError as exc:
            outcome = ExplainError(msg.request_id, msg.model, exc)
        code = "OK" if isinstance(outcome, ExplainResult) else code_of(outcome.error).name
        label = msg.model if known else ""  # unknown names would grow the label set
        kind = await self._kind(msg.model) if known else ""
        self.metrics.observe(label, method, kind, code, time.monotonic() - start)
        return outcome, queued

    @staticmethod
    def _response(outcome: ExplainResult, queued: float) -> pb.ExplainResponse:
        return response_of(outcome, {"queue": queued})

    # ------------------------------------------------------------------ RPCs
    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        """One item; a failed item is the call's status."""
        outcome, queued = await self._one(request, context, "Explain")
        if isinstance(outcome, ExplainError):
            await context.abort(code_of(outcome.error), str(outcome.error))
            raise AssertionError("abort returned")  # pragma: no cover
        return self._response(outcome, queued)

    async def ExplainBatch(
        self, request: pb.ExplainBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainBatchResponse:
        """Many items, each answered in order by its response or its status."""
        n = len(request.requests)
        if n > self.max_batch_items:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requests has {n} items; at most {self.max_batch_items} (max_batch_items)",
            )
        outcomes = await asyncio.gather(
            *(self._one(r, context, "ExplainBatch") for r in request.requests)
        )
        out = pb.ExplainBatchResponse()
        for outcome, queued in outcomes:
            if isinstance(outcome, ExplainError):
                out.items.add(error=status_of(outcome.error))
            else:
                out.items.add(response=self._response(outcome, queued))
        return out

    async def ExplainStream(
        self,
        request_iterator: AsyncIterator[pb.ExplainRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ExplainResponse]:
        """Answers items as they finish, each tagged with its request_id."""
        answers: asyncio.Queue[pb.ExplainResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_batch_items)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(msg: pb.ExplainRequest) -> None:
            try:
                outcome, queued = await self._one(msg, context, "ExplainStream")
                if isinstance(outcome, ExplainError):
                    await answers.put(
                        pb.ExplainResponse(
                            request_id=msg.request_id,
                            model=msg.model,
                            error=status_of(outcome.error),
                        )
                    )
                else:
                    await answers.put(self._response(outcome, queued))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(answer(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader  # re-raises a failure of the request stream
        finally:
            for task in (reader, *tasks):
                task.cancel()
            for task in (reader, *list(tasks)):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every served model with its description."""
        try:
            names = sorted(await asyncio.to_thread(self.dispatcher.refresh))
            infos = [model_info_of(await self._describe(n)) for n in names]
        except CamserveError as exc:
            await context.abort(code_of(exc), str(exc))
            raise AssertionError("abort returned") from exc  # pragma: no cover
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the backend did not answer: {exc}")
            raise AssertionError("abort returned") from exc  # pragma: no cover
        return pb.ListModelsResponse(models=infos)

    async def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """One model's description; NOT_FOUND for an unknown name."""
        try:
            if not request.model:
                raise InvalidRequestError("model is required, got ''")
            if not await self._known(request.model):
                raise UnknownNameError("model", request.model, self.dispatcher.names)
            return model_info_of(await self._describe(request.model))
        except CamserveError as exc:
            await context.abort(code_of(exc), str(exc))
            raise AssertionError("abort returned") from exc  # pragma: no cover

"""Dynamic batching, deadlines, cancellation, back-pressure and graceful shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from camserve.gateway.batcher import ModelQueue
from camserve.gateway.proto import pb
from camserve.gateway.server import BackgroundGateway
from tests.gateway.conftest import EngineBackend, png, start, stub


def wait_until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def queues(gw: BackgroundGateway) -> dict[str, ModelQueue]:
    dispatcher = gw.gateway.dispatcher
    return {} if dispatcher is None else dispatcher.queues


@contextmanager
def first_item_held(backend: EngineBackend) -> Iterator[tuple[BackgroundGateway, Any, Any]]:
    """A gateway with batches of one whose backend holds item "first" until its gate opens.

    Yields the gateway, a stub, and the future of "first" (already in the backend).
    """
    gw = start(backend, max_batch_size=1)
    try:
        s = stub(gw)
        backend.gate.clear()
        first = s.Explain.future(pb.ExplainRequest(request_id="first", model="tiny", image=png(0)))
        wait_until(lambda: "tiny" in queues(gw) and queues(gw)["tiny"].batches == 1)
        yield gw, s, first
    finally:
        backend.gate.set()
        gw.stop()


def maps_of(resp: pb.ExplainResponse) -> dict[tuple[int, str], np.ndarray]:
    return {
        (int(t.id), m.method): np.frombuffer(m.data.data, "<f4").reshape(tuple(m.data.shape))
        for t in resp.targets
        for m in t.maps
    }


REQUESTS = [
    pb.ExplainRequest(request_id="0", model="tiny", image=png(0), methods=["gradcam"], top_k=1),
    pb.ExplainRequest(
        request_id="1", model="tiny", image=png(1), methods=["gradcampp", "xgradcam"], top_k=3
    ),
    pb.ExplainRequest(
        request_id="2", model="tiny", image=png(2), methods=["layercam"], class_ids=[4, 0]
    ),
    pb.ExplainRequest(
        request_id="3",
        model="tiny",
        image=png(3),
        methods=["hirescam", "gradcam"],
        top_k=2,
        output=pb.OUTPUT_RAW,
    ),
    pb.ExplainRequest(request_id="4", model="tiny", image=png(4), methods=["counterfactual"]),
    pb.ExplainRequest(
        request_id="5", model="tiny", image=png(5), methods=["gradcam"], class_ids=[2]
    ),
]


def test_concurrent_callers_get_their_own_answers_equal_to_separate_calls() -> None:
    alone = EngineBackend()
    gw = start(alone, max_batch_size=1)
    try:
        separate = {r.request_id: stub(gw).Explain(r, timeout=30) for r in REQUESTS}
    finally:
        gw.stop()
    assert set(alone.calls) == {1}

    grouped = EngineBackend()
    gw = start(grouped, max_batch_size=16, max_batch_delay_ms=200)
    try:
        s = stub(gw)
        barrier = threading.Barrier(len(REQUESTS))

        def call(r: pb.ExplainRequest) -> pb.ExplainResponse:
            barrier.wait()
            return s.Explain(r, timeout=30)

        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            together = dict(
                zip([r.request_id for r in REQUESTS], pool.map(call, REQUESTS), strict=True)
            )
    finally:
        gw.stop()
    assert max(grouped.calls) > 1, grouped.calls  # they did share backend calls
    assert sum(grouped.calls) == len(REQUESTS)
    for rid, one in separate.items():
        both = together[rid]
        assert both.request_id == rid
        assert [t.id for t in both.targets] == [t.id for t in one.targets]
        assert [p.id for p in both.predictions] == [p.id for p in one.predictions]
        assert both.output == one.output
        a, b = maps_of(one), maps_of(both)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=f"{rid} {key}")
        assert both.batch_size >= 1 and one.batch_size == 1


def test_an_item_past_its_deadline_is_not_computed(backend: EngineBackend) -> None:
    with first_item_held(backend) as (_, s, first):
        late = s.Explain.future(
            pb.ExplainRequest(request_id="late", model="tiny", image=png(1)), timeout=0.3
        )
        with pytest.raises(grpc.RpcError) as info:
            late.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        backend.gate.set()
        assert first.result(timeout=30).request_id == "first"
        time.sleep(0.2)
        assert backend.computed == ["first"]


def test_deadline_exceeded_inside_a_batch_call(backend: EngineBackend) -> None:
    """ExplainBatch: the late item gets its own DEADLINE_EXCEEDED status, uncomputed."""
    with first_item_held(backend) as (_, s, first):
        threading.Timer(0.5, backend.gate.set).start()
        # 0.3 s deadline as seen by the server; the client waits longer for the answer
        batch = s.ExplainBatch.future(
            pb.ExplainBatchRequest(
                requests=[pb.ExplainRequest(request_id="b", model="tiny", image=png(1))]
            ),
            timeout=0.3,
        )
        with pytest.raises(grpc.RpcError) as info:
            batch.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first.result(timeout=30)
        time.sleep(0.2)
        assert "b" not in backend.computed


def test_a_cancelled_call_drops_its_queued_item(backend: EngineBackend) -> None:
    with first_item_held(backend) as (gw, s, first):
        gone = s.Explain.future(pb.ExplainRequest(request_id="gone", model="tiny", image=png(1)))
        wait_until(lambda: len(queues(gw)["tiny"]) == 1)
        gone.cancel()
        wait_until(lambda: all(t.future.done() for t in queues(gw)["tiny"]._items))
        backend.gate.set()
        assert first.result(timeout=30).request_id == "first"
        time.sleep(0.2)
        assert backend.computed == ["first"]


def test_a_full_queue_answers_resource_exhausted_at_once(backend: EngineBackend) -> None:
    gw = start(backend, max_batch_size=1, max_queue_size=2)
    try:
        s = stub(gw)
        s.ListModels(pb.ListModelsRequest(), timeout=30)  # channel connected
        backend.gate.clear()
        calls = [
            s.Explain.future(pb.ExplainRequest(request_id=str(i), model="tiny", image=png(i)))
            for i in range(3)
        ]  # one computing, two queued
        wait_until(lambda: "tiny" in queues(gw) and len(queues(gw)["tiny"]) == 2)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            s.Explain(pb.ExplainRequest(model="tiny", image=png(9)), timeout=30)
        elapsed = time.perf_counter() - t0
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_size" in info.value.details()
        assert elapsed < 0.05, elapsed
        backend.gate.set()
        assert [c.result(timeout=30).request_id for c in calls] == ["0", "1", "2"]
    finally:
        backend.gate.set()
        gw.stop()


def test_graceful_shutdown_finishes_in_flight_and_refuses_queued(backend: EngineBackend) -> None:
    gw = start(backend, max_batch_size=1)
    s = stub(gw)
    backend.gate.clear()
    running = s.Explain.future(pb.ExplainRequest(request_id="run", model="tiny", image=png(0)))
    wait_until(lambda: "tiny" in queues(gw) and queues(gw)["tiny"].batches == 1)
    queued = s.Explain.future(pb.ExplainRequest(request_id="queued", model="tiny", image=png(1)))
    wait_until(lambda: len(queues(gw)["tiny"]) == 1)
    threading.Timer(0.3, backend.gate.set).start()
    gw.stop(grace=10)
    assert running.result(timeout=30).request_id == "run"
    with pytest.raises(grpc.RpcError) as info:
        queued.result(timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert backend.computed == ["run"]


def test_a_cancelled_stream_drops_its_queued_items(backend: EngineBackend) -> None:
    with first_item_held(backend) as (gw, s, first):
        sent, done = threading.Event(), threading.Event()

        def requests() -> Iterator[pb.ExplainRequest]:
            for i in range(3):
                yield pb.ExplainRequest(request_id=f"s{i}", model="tiny", image=png(i + 1))
            sent.set()
            done.wait(30)  # keep the stream open until it is cancelled

        call = s.ExplainStream(requests())
        wait_until(lambda: sent.is_set() and len(queues(gw)["tiny"]) == 3)
        call.cancel()
        done.set()
        wait_until(lambda: all(t.future.done() for t in queues(gw)["tiny"]._items))
        backend.gate.set()
        assert first.result(timeout=30).request_id == "first"
        time.sleep(0.2)
        assert backend.computed == ["first"]

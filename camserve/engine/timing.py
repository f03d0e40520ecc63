"""Stage timings: CUDA events on a GPU, a monotonic clock on the CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["Stopwatch"]


class Stopwatch:
    """Accumulates the seconds spent in named stages of one call.

    On a CUDA device each stage is bracketed by CUDA events (read once, at
    :meth:`result`, so timing never forces a sync in the middle of the work);
    elsewhere :func:`time.perf_counter` is used. A stage timed twice adds up.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        self._cpu: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as ``name``."""
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._cpu[name] = self._cpu.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name`` (measured elsewhere)."""
        self._cpu[name] = self._cpu.get(name, 0.0) + seconds

    def result(self) -> dict[str, float]:
        """Seconds per stage (waits for the recorded CUDA events)."""
        out = dict(self._cpu)
        for name, start, end in self._events:
            end.synchronize()
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        return out

"""One injected clock for the batcher, the gate and the energy ledger.

``now()`` is seconds on a monotonic clock; ``wait(event, deadline_s)`` waits for an event or a
deadline on that clock, whichever comes first. ``MonotonicClock`` is the real one; ``FakeClock`` sits
next to it (a test double, like ``FakeGpu`` beside ``NvmlGpu``): time moves only when a test calls
``advance``, so window and hold rules are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import Any, Protocol

__all__ = ["Clock", "FakeClock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float: ...

    async def wait(self, event: asyncio.Event, deadline_s: float) -> bool:
        """Wait until ``event`` is set (True) or ``deadline_s`` passes (False)."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, deadline_s: float) -> bool:
        if event.is_set():
            return True
        timeout = deadline_s - time.monotonic()
        if timeout <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return event.is_set()


class FakeClock:
    """Time stands still until ``advance``; waiters whose deadline has passed then wake up."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def wait(self, event: asyncio.Event, deadline_s: float) -> bool:
        if event.is_set():
            return True
        if deadline_s <= self._now:
            return False
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (deadline_s, next(self._seq), timer))
        waiter: asyncio.Future[Any] = asyncio.ensure_future(event.wait())
        both: list[asyncio.Future[Any]] = [waiter, timer]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()
        return event.is_set()

    async def advance(self, dt_s: float) -> None:
        """Move time forward and let every task that can run, run."""
        self._now += dt_s
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.done():
                timer.set_result(None)
        for _ in range(20):
            await asyncio.sleep(0)

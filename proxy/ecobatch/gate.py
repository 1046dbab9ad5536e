"""The continuous gate: one request at a time into an engine that batches in flight (vLLM).

Its loop:

* **busy engine** (something of ours in flight): a new request is released at once, up to the in-flight
  cap: joining the running decode steps is nearly free;
* **idle engine**: the window holds arrivals (``policy.window_length_s`` / ``should_close``) and
  releases them together, so they start, and end, close together and the GPU idles between groups
  (power is concave in concurrency: on the H200, holding only while idle saved 9-25 % of J/request
  where a fixed window of the same length saved 0-9 %);
* the **cap** is the policy's choice on the per-concurrency energy curve, under KV headroom and the
  SLO: at most that many sequences in flight, and **each slot frees the moment its own request ends**.

Each released request runs as its own task (``engine.generate``); a client that leaves cancels it,
which aborts the request in the engine and frees its slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .admission import Outcome, Pending
from .backends.base import ContinuousEngine
from .dispatcher import Dispatcher
from .domain import GenerationResult
from .errors import ShuttingDown

__all__ = ["ContinuousGate"]


class ContinuousGate(Dispatcher):
    _engine: ContinuousEngine

    async def _run(self) -> None:
        admission = self._admission
        while True:
            await admission.wait_for_work()
            decision = admission.decide(inflight=self._inflight)
            cap = decision.batch_size
            idle = self._inflight == 0
            # an idle engine: hold the window, release the group together
            if idle and not await admission.collect(cap, admission.deadline_s(decision)):
                continue
            room = cap - self._inflight
            if room <= 0 or (self._inflight > 0 and admission.queue[0].request.sequences > room):
                self._room.clear()
                await self._room.wait()
                continue
            self._release(admission.take(room))

    def _release(self, group: list[Pending]) -> None:
        if not group:
            return
        dispatched_s, sequences = self._dispatched(group)
        for pending in group:
            self._set_inflight(pending.request.sequences)
            task = asyncio.create_task(self._serve(pending, dispatched_s, sequences))
            self._tasks.add(task)
            # the slot frees when the task is done, even one cancelled before it ever ran
            task.add_done_callback(self._finisher(pending))
            pending.future.add_done_callback(_canceller(task))

    def _finisher(self, pending: Pending) -> Callable[[asyncio.Task[None]], None]:
        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._set_inflight(-pending.request.sequences)
            if not pending.future.done():  # cancelled (shutdown) before it started
                pending.future.set_exception(ShuttingDown("ecobatch shut down before this request ran"))

        return finished

    async def _serve(self, pending: Pending, dispatched_s: float, group_size: int) -> None:
        span, job = self._job(pending)
        result: GenerationResult | BaseException = ShuttingDown("ecobatch shut down while this request ran")
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await self._engine.generate(job)
        except TimeoutError:
            result = self._timeout()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result = exc
        finally:
            self._resolve(pending, span, result, dispatched_s, group_size)


def _canceller(task: asyncio.Task[None]) -> Callable[[asyncio.Future[Outcome]], None]:
    """A done-callback that stops ``task`` when the client's future is cancelled (the client left)."""

    def cancel(future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():
            task.cancel()

    return cancel

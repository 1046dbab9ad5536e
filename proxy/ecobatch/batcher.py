"""The batching loop: a bounded queue, an adaptive window, dispatch under an in-flight cap.

One background task loops:

1. wait for the first arrival; the window opens at that request's arrival time;
2. ask the policy for a batch size (the energy curve under KV headroom and the latency SLO) and a
   window length (``policy.window_length_s``);
3. collect until ``policy.should_close`` says so (target reached, deadline passed, or no further arrival
   expected before the deadline);
4. wait for room: a static engine (HF, simulated) runs one batch at a time; a continuous engine (vLLM)
   gets at most ``batch_size`` sequences in flight, so the engine sits at the curve's sweet spot;
5. take up to the room from the queue and dispatch the batch as its own task, with an energy span
   around it; attribute the span's joules to the requests; resolve every future.

Every future is resolved on every path: a result, the request's own error, a batch-wide error, or
``ShuttingDown``. A cancelled future (its client went away) is dropped before dispatch, and a backend
sees ``cancelled()`` for one already dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .arrivals import ArrivalRate
from .backends.base import Backend, BatchItem, Emit, GenerationResult
from .config import BatchingSettings
from .energy import EnergyMeter
from .errors import BackendFailed, BackendTimeout, EcobatchError, Overloaded, ShuttingDown
from .metrics import Metrics
from .openai_api import GenerationRequest
from .policy import Decision, Demand, choose_batch_size, should_close, window_length_s
from .profile import EnergyProfile

__all__ = ["Batcher", "Outcome", "Pending"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a served request gets back: the engine's result and its share of the batch's energy."""

    result: GenerationResult
    energy_joules: float
    energy_source: str
    queue_wait_s: float
    batch_size: int


@dataclass(eq=False, slots=True)
class Pending:
    request: GenerationRequest
    future: asyncio.Future[Outcome]
    arrival_s: float
    emit: Emit | None


class _Demand:
    """Running means of prompt and completion tokens per sequence, seeded from the settings."""

    def __init__(self, prompt_tokens: float, completion_tokens: float, smoothing: float = 0.1) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self._smoothing = smoothing

    def observe(self, prompt_tokens: float, completion_tokens: float) -> None:
        a = self._smoothing
        self.prompt_tokens += a * (prompt_tokens - self.prompt_tokens)
        self.completion_tokens += a * (max(completion_tokens, 1.0) - self.completion_tokens)

    def now(self) -> Demand:
        return Demand(self.prompt_tokens, self.completion_tokens)


class Batcher:
    def __init__(
        self,
        backend: Backend,
        meter: EnergyMeter,
        metrics: Metrics,
        profile: EnergyProfile,
        settings: BatchingSettings,
        *,
        request_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._meter = meter
        self._metrics = metrics
        self._profile = profile
        self._settings = settings
        self._timeout_s = request_timeout_s
        self._clock = clock
        self._model = backend.model
        self._queue: deque[Pending] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._rate = ArrivalRate()
        self._demand = _Demand(settings.expected_prompt_tokens, settings.expected_completion_tokens)
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_decision: Decision | None = None

    # ---- configuration -------------------------------------------------------------------------
    @property
    def settings(self) -> BatchingSettings:
        return self._settings

    def reconfigure(self, settings: BatchingSettings) -> None:
        """Swap the batching settings at run time; the next window uses them."""
        self._settings = settings
        self._arrived.set()

    # ---- submission ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Emit | None = None) -> Pending:
        """Queue a validated request; raises ``Overloaded`` when the queue is full."""
        if self._closing:
            raise ShuttingDown("ecobatch is shutting down; retry on another replica")
        if len(self._queue) >= self._settings.max_queue:
            raise Overloaded(
                f"queue is full: {len(self._queue)} requests, batching.max_queue="
                f"{self._settings.max_queue}; retry later",
                retry_after_s=self._retry_after_s(),
            )
        now = self._clock()
        pending = Pending(request, asyncio.get_running_loop().create_future(), now, emit)
        self._queue.append(pending)
        self._rate.observe(now)
        self._metrics.queue_depth.labels(self._model).set(len(self._queue))
        self._arrived.set()
        return pending

    def _retry_after_s(self) -> float:
        latency = self.last_decision.expected_latency_s if self.last_decision else 1.0
        return max(1.0, math.ceil(latency))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        return self._inflight

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="ecobatch-batcher")

    async def close(self, grace_s: float) -> None:
        """Refuse new requests, let queued and in-flight ones finish for up to ``grace_s``, then fail
        whatever is left with ``ShuttingDown``."""
        self._closing = True
        deadline = self._clock() + grace_s
        while (self._queue or self._tasks) and self._clock() < deadline:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=max(0.0, deadline - self._clock()))
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown("ecobatch shut down before this request ran"))

    # ---- the loop ------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        if any(p.future.done() for p in self._queue):
            self._queue = deque(p for p in self._queue if not p.future.done())
            self._metrics.queue_depth.labels(self._model).set(len(self._queue))

    def _queued_sequences(self) -> int:
        return sum(p.request.sequences for p in self._queue)

    def decide(self, window_s: float = 0.0) -> Decision:
        s = self._settings
        return choose_batch_size(
            self._profile,
            self._backend.headroom(),
            self._demand.now(),
            slo_s=s.slo_ms / 1000.0,
            max_batch_size=s.max_batch_size,
            energy_tolerance=s.energy_tolerance,
            inflight=self._inflight,
            window_s=window_s,
        )

    async def _run(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            try:
                await self._one_window()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad window kill the loop
                log.exception("batching window failed")
                await asyncio.sleep(0.01)

    async def _one_window(self) -> None:
        s = self._settings
        opened_s = self._queue[0].arrival_s
        decision = self.decide()
        target = decision.batch_size
        self._publish(decision)
        slack_s = s.slo_ms / 1000.0 - decision.expected_latency_s - (self._clock() - opened_s)
        deadline_s = opened_s + window_length_s(
            arrival_rate_per_s=self._rate.per_s(self._clock()),
            target=target,
            window_min_s=s.window_min_ms / 1000.0,
            window_max_s=s.window_max_ms / 1000.0,
            slo_slack_s=slack_s,
        )
        while True:
            self._drop_cancelled()
            if not self._queue:
                return
            now = self._clock()
            if should_close(
                now_s=now,
                deadline_s=deadline_s,
                collected=self._queued_sequences(),
                target=target,
                arrival_rate_per_s=self._rate.per_s(now),
            ):
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=deadline_s - now)
        self._metrics.window.labels(self._model).observe(max(0.0, self._clock() - opened_s))
        room = await self._wait_for_room(target)
        batch = self._take(room)
        if batch:
            # reserve the room now, before the task runs, so the next window sees it taken
            self._inflight += sum(p.request.sequences for p in batch)
            self._metrics.inflight.labels(self._model).set(self._inflight)
            task = asyncio.create_task(self._dispatch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _wait_for_room(self, target: int) -> int:
        """Sequences that may be dispatched now: a static engine waits for an empty GPU; a continuous
        one for fewer than ``target`` sequences in flight."""
        while True:
            busy = self._inflight > 0 if not self._backend.continuous else self._inflight >= target
            if not busy:
                return target - self._inflight if self._backend.continuous else target
            self._room.clear()
            await self._room.wait()

    def _take(self, room: int) -> list[Pending]:
        self._drop_cancelled()
        batch: list[Pending] = []
        taken = 0
        while self._queue:
            n = self._queue[0].request.sequences
            if batch and taken + n > room:
                break
            batch.append(self._queue.popleft())
            taken += n
        self._metrics.queue_depth.labels(self._model).set(len(self._queue))
        return batch

    def _publish(self, decision: Decision) -> None:
        self.last_decision = decision
        self._metrics.policy_batch_size.labels(self._model).set(decision.batch_size)
        self._metrics.policy_decisions.labels(self._model, decision.limited_by).inc()

    # ---- one batch -----------------------------------------------------------------------------
    async def _dispatch(self, batch: list[Pending]) -> None:
        sequences = sum(p.request.sequences for p in batch)
        dispatched_s = self._clock()
        for p in batch:
            self._metrics.queue_wait.labels(self._model).observe(dispatched_s - p.arrival_s)
        items = [BatchItem(p.request, p.emit, p.future.cancelled) for p in batch]
        span = self._meter.begin(self._inflight if self._backend.continuous else sequences)
        try:
            results = await self._generate(items)
            served = [(p, r) for p, r in zip(batch, results, strict=True) if isinstance(r, GenerationResult)]
            energy = await self._meter.end(span, [r.usage for _, r in served])
            delivered = [not p.future.cancelled() for p, _ in served]
            self._metrics.observe_batch(energy, [r.usage for _, r in served], sequences, delivered)
            for (p, r), joules in zip(served, energy.per_request_joules, strict=True):
                per_seq = max(p.request.sequences, 1)
                self._demand.observe(r.usage.prompt_tokens / per_seq, r.usage.completion_tokens / per_seq)
                if not p.future.done():
                    p.future.set_result(
                        Outcome(r, joules, energy.source, dispatched_s - p.arrival_s, sequences)
                    )
            for p, failed in zip(batch, results, strict=True):
                if isinstance(failed, BaseException) and not p.future.done():
                    p.future.set_exception(failed)
        except BaseException as exc:
            failure = exc if isinstance(exc, EcobatchError) else BackendFailed(f"batch failed: {exc!r}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.exception("batch of %d failed", len(batch))
        finally:
            self._inflight -= sequences
            self._metrics.inflight.labels(self._model).set(self._inflight)
            self._room.set()

    async def _generate(self, items: Sequence[BatchItem]) -> list[GenerationResult | BaseException]:
        try:
            results = await asyncio.wait_for(self._backend.generate(items), timeout=self._timeout_s)
        except TimeoutError:
            error = BackendTimeout(
                f"the engine did not finish within backend.request_timeout_s={self._timeout_s}"
            )
            return [error] * len(items)
        if len(results) != len(items):
            raise BackendFailed(f"backend returned {len(results)} results for {len(items)} requests")
        return [
            r if isinstance(r, GenerationResult | EcobatchError) else BackendFailed(f"engine error: {r}")
            for r in results
        ]

"""The interface the app uses to run requests, and what both shapes share.

Two shapes, two classes: ``batcher.StaticBatcher`` (batch in, batch out, one batch at a time) and
``gate.ContinuousGate`` (one request at a time under an in-flight cap). Each implements ``_run``, its
own loop; everything around it lives here once: submission, run-time reconfiguration, the energy span
of every request (begun at dispatch, ended on every path), the resolution of every future, and a
bounded shutdown.

Every future is resolved on every path: a result, the request's own error, a batch-wide error, a
time-out (504), or ``ShuttingDown`` (503). A future cancelled by its handler (the client left) is
dropped from the queue, or its work is stopped in the engine.
"""

from __future__ import annotations

import asyncio
import logging

from .admission import Admission, Outcome, Pending
from .backends.base import Emit, Engine, Job
from .clock import Clock, MonotonicClock
from .config import BatchingSettings
from .domain import GenerationRequest, GenerationResult, Usage
from .energy.ledger import Ledger, Span
from .energy.receipts import Receipts
from .errors import BackendFailed, BackendTimeout, EcobatchError, ShuttingDown
from .metrics import Metrics
from .policy import Decision
from .profile import EnergyProfile

__all__ = ["Dispatcher"]

#: how long a closing dispatcher waits for cancelled work to stop before answering its requests anyway
STOP_WAIT_S = 1.0

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        engine: Engine,
        ledger: Ledger,
        receipts: Receipts,
        metrics: Metrics,
        profile: EnergyProfile,
        settings: BatchingSettings,
        *,
        request_timeout_s: float,
        clock: Clock | None = None,
    ) -> None:
        self._engine = engine
        self._ledger = ledger
        self._receipts = receipts
        self._metrics = metrics
        self._profile = profile
        self._timeout_s = request_timeout_s
        self._clock: Clock = clock or MonotonicClock()
        self._model = engine.model
        self._admission = Admission(
            settings, profile, metrics, model=self._model, headroom=engine.headroom, clock=self._clock
        )
        self._inflight = 0
        self._room = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # requests running on their own (continuous)
        self._running: dict[int, Pending] = {}  # dispatched, not yet resolved (by id: one answer each)

    # ---- what the app uses ---------------------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Emit | None = None) -> Pending:
        """Queue a prepared request; raises ``Overloaded`` when the queue is full, ``ShuttingDown``
        while closing."""
        return self._admission.submit(request, emit)

    def withdraw(self, pending: Pending) -> None:
        """The client left: drop the request from the queue, or stop its work in the engine."""
        self._admission.withdraw(pending)

    @property
    def settings(self) -> BatchingSettings:
        return self._admission.settings

    def reconfigure(self, settings: BatchingSettings) -> None:
        """Swap the batching settings at run time: an open window and a wait for room are re-decided
        under them at once."""
        self._admission.reconfigure(settings)
        self._room.set()

    @property
    def last_decision(self) -> Decision | None:
        return self._admission.last_decision

    def decide(self) -> Decision:
        return self._admission.decide(self._inflight)

    @property
    def queue_depth(self) -> int:
        return len(self._admission.queue)

    @property
    def inflight(self) -> int:
        return self._inflight

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name=f"ecobatch-{type(self).__name__}")

    async def close(self, grace_s: float) -> None:
        """Refuse new requests; let queued and in-flight ones finish for up to ``grace_s``; then fail
        what is left with ``ShuttingDown``."""
        admission = self._admission
        admission.closing = True
        deadline = self._clock.now() + grace_s
        while (admission.queue or self._inflight) and self._clock.now() < deadline:
            self._room.clear()
            await self._clock.wait(self._room, deadline)
        # Stop the work; an engine that does not stop (a GPU worker thread that finishes its step
        # first, or one stuck for good) gets STOP_WAIT_S, and its requests are answered anyway.
        stopping = {t for t in (self._loop_task, *self._tasks) if t is not None}
        for task in stopping:
            task.cancel()
        if stopping:
            await asyncio.wait(stopping, timeout=STOP_WAIT_S)
        stuck = ShuttingDown("ecobatch shut down while this request ran: the engine did not stop in time")
        for pending in list(self._running.values()):
            if not pending.future.done():
                pending.future.set_exception(stuck)
        admission.fail_queued(ShuttingDown("ecobatch shut down before this request ran"))

    # ---- for the two shapes --------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad round kill the loop
                log.exception("dispatch loop failed; restarting it")
                await asyncio.sleep(0.01)

    async def _run(self) -> None:
        raise NotImplementedError

    def _set_inflight(self, delta: int) -> None:
        self._inflight += delta
        self._metrics.child(self._metrics.inflight, self._model).set(self._inflight)
        if delta < 0:
            self._room.set()

    def _dispatched(self, group: list[Pending]) -> tuple[float, int]:
        """Record a group leaving the queue: (dispatch time, its sequences)."""
        now = self._clock.now()
        sequences = sum(p.request.sequences for p in group)
        metrics = self._metrics
        metrics.child(metrics.batch_size, self._model).observe(sequences)
        if self._admission.last_decision is not None:
            metrics.child(
                metrics.policy_decisions, self._model, self._admission.last_decision.limited_by
            ).inc()
        wait = metrics.child(metrics.queue_wait, self._model)
        for p in group:
            wait.observe(now - p.arrival_s)
            self._running[id(p)] = p
        return now, sequences

    def _job(self, pending: Pending, ledger: Ledger | None = None) -> tuple[Span, Job]:
        """The request's energy span, on the ledger of the GPUs that run it, and its engine job."""
        span = (ledger or self._ledger).begin(pending.request.id, pending.request.sequences)
        job = Job(pending.request, pending.emit, span.progress, pending.future.cancelled)
        return span, job

    def _timeout(self) -> BackendTimeout:
        return BackendTimeout(f"the engine did not finish within backend.request_timeout_s={self._timeout_s}")

    def _resolve(
        self,
        pending: Pending,
        span: Span,
        result: GenerationResult | BaseException,
        dispatched_s: float,
        group_size: int,
        in_flight: int | None = None,
    ) -> None:
        """End the request's energy span and resolve its future: the one place both happen.
        ``in_flight``: the sequences on the request's engine (its replica), for an estimate."""
        self._running.pop(id(pending), None)
        self._admission.observe_done()
        delivered = not pending.future.done()
        answer: Outcome | EcobatchError
        if isinstance(result, GenerationResult):
            answer = self._account(pending, span, result, delivered, dispatched_s, group_size)
        else:
            estimate = self._estimated_usage(pending, span, dispatched_s, in_flight)
            span.end(estimate, delivered=False)
            answer = as_error(result)
        if delivered and not pending.future.done():
            if isinstance(answer, Outcome):
                pending.future.set_result(answer)
            else:
                pending.future.set_exception(answer)

    def _estimated_usage(
        self, pending: Pending, span: Span, dispatched_s: float, in_flight: int | None = None
    ) -> Usage | None:
        """The tokens of a request that ended without the engine's count (its client left, a 502, a
        504), so that it carries its share of the joules it used instead of leaving them to its
        neighbours: its prompt (when the engine measured it), and what one of the sequences in flight
        decodes in the time it ran at the profile's per-sequence rate, at most its ``max_tokens``. A
        stream's chunks are its count (``None``: the ledger uses them)."""
        if span.tokens_seen:
            return None
        request = pending.request
        running = max(self._inflight if in_flight is None else in_flight, request.sequences, 1)
        per_sequence_tok_s = self._profile.at(running).tokens_per_s / running
        decoded = (self._clock.now() - dispatched_s) * per_sequence_tok_s * request.sequences
        if request.max_tokens is not None:
            decoded = min(decoded, request.max_tokens * request.sequences)
        return Usage(sum(request.prompt_tokens or ()), int(decoded))

    def _account(
        self,
        pending: Pending,
        span: Span,
        result: GenerationResult,
        delivered: bool,
        dispatched_s: float,
        group_size: int,
    ) -> Outcome:
        usage = result.usage
        concurrency = span.end(usage, delivered=delivered)
        provisional = self._profile.at(max(concurrency, 1.0)).joules_per_token * usage.completion_tokens
        source = span.source
        try:  # bookkeeping beside the answer: its failure must not cost the client its result
            self._receipts.pending(pending.request.id, provisional_joules=provisional, source=source)
            self._metrics.observe_tokens(usage)
            self._admission.observe_demand(usage, pending.request.sequences)
        except Exception:
            log.exception("bookkeeping for request %s failed", pending.request.id)
        return Outcome(result, dispatched_s - pending.arrival_s, group_size, provisional, source)


def as_error(exc: BaseException) -> EcobatchError:
    """An engine's exception as the client's error (anything unexpected is a 502)."""
    return exc if isinstance(exc, EcobatchError) else BackendFailed(f"engine error: {exc!r}")

"""The interface the app uses to run requests, and what both shapes share.

Two shapes, two classes: ``batcher.StaticBatcher`` (batch in, batch out, one batch at a time) and
``gate.ContinuousGate`` (one request at a time, released by the run-time controller). Each implements
``_run``, its own loop; everything around it lives here once: submission, run-time reconfiguration,
the energy span of every request (begun at dispatch on the energy account of the replica that runs it,
ended there on every path: the account writes its estimate and receipt), the resolution of every
future, and a bounded shutdown.

Every future is resolved on every path: a result, the request's own error, a batch-wide error, a
time-out (504), or ``ShuttingDown`` (503). A future cancelled by its handler (the client left) is
dropped from the queue, or its work is stopped in the engine.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from ..clock import Clock, MonotonicClock
from ..config import BatchingSettings
from ..domain import TIERS, EngineOutput, GenerationRequest, GenerationResult, Tier, Usage
from ..energy.account import Charge, EnergyAccount
from ..energy.ledger import Span
from ..engines.base import Emit, EngineShape
from ..errors import BackendFailed, BackendTimeout, EcobatchError, ShuttingDown
from ..profile import EnergyProfile
from .admission import Admission, Outcome, Pending
from .load import LoadTracker
from .metrics import Metrics

__all__ = ["Dispatcher", "as_error"]

#: how long a closing dispatcher waits for cancelled work to stop before answering its requests anyway
STOP_WAIT_S = 1.0
#: rounds in a row that fail, none done between, before what waits in the queue is answered with the error
LOOP_FAILURES_BEFORE_FAILING_QUEUE = 3

log = logging.getLogger(__name__)


class Dispatcher:
    #: which engines it drives: the settings that apply (config.SHAPE_ONLY_SETTINGS)
    shape: ClassVar[EngineShape]

    def __init__(
        self,
        metrics: Metrics,
        profile: EnergyProfile,
        settings: BatchingSettings,
        *,
        model: str,
        request_timeout_s: float,
        clock: Clock | None = None,
        max_prompts_per_request: int = 64,
        tiers: frozenset[Tier] = frozenset(TIERS),
    ) -> None:
        self._metrics = metrics
        self._profile = profile
        self._timeout_s = request_timeout_s
        self._clock: Clock = clock or MonotonicClock()
        self._model = model
        self.load = LoadTracker(
            window_s=settings.load_window_s,
            expected_completion_tokens=settings.expected_completion_tokens,
            profile=profile,
        )
        self._admission = Admission(
            settings,
            metrics,
            model=model,
            clock=self._clock,
            load=self.load,
            max_prompts_per_request=max_prompts_per_request,
            tiers=tiers,
        )
        self._inflight = 0
        self._failed_rounds = 0  # rounds of the loop that failed, none done between
        self._room = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # requests running on their own (continuous)
        self._running: dict[int, Pending] = {}  # dispatched, not yet resolved (by id: one answer each)

    # ---- what the app uses ---------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Pending:
        """Queue a prepared request (a streamed one's outputs come through ``Pending.outputs``); raises
        ``Overloaded`` when the queue is full, ``ShuttingDown`` while closing."""
        return self._admission.submit(request)

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

    def view(self) -> dict[str, Any]:
        """What the dispatcher decides from and what it decided last (``GET /ecobatch/batching``)."""
        raise NotImplementedError

    @property
    def queue_depth(self) -> int:
        return self._admission.queued

    @property
    def inflight(self) -> int:
        """Sequences dispatched to the engine and not finished."""
        return self._inflight

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name=f"ecobatch-{type(self).__name__}")

    async def close(self, grace_s: float) -> None:
        """Refuse new requests; let queued and in-flight ones finish for up to ``grace_s``; then fail
        what is left with ``ShuttingDown``."""
        admission = self._admission
        admission.closing = True
        deadline = self._clock.now() + grace_s
        while (admission.queued or self._inflight) and self._clock.now() < deadline:
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
            except Exception as exc:  # never let one bad round kill the loop
                log.exception("dispatch loop failed; restarting it")
                # failing round after round, with none done between: a bug every round meets. The queue
                # would never move, so what waits in it is answered (500) rather than left to time out
                self._failed_rounds += 1
                if self._failed_rounds >= LOOP_FAILURES_BEFORE_FAILING_QUEUE:
                    self._admission.fail_queued(
                        EcobatchError(f"ecobatch's dispatch loop fails on every round: {exc!r}")
                    )
                    self._failed_rounds = 0
                await asyncio.sleep(0.01)

    def _round_done(self) -> None:
        """A round of the loop went through: failures since are counted afresh."""
        self._failed_rounds = 0

    async def _run(self) -> None:
        raise NotImplementedError

    def _set_inflight(self, delta: int) -> None:
        self._inflight += delta
        self._metrics.child(self._metrics.inflight, self._model).set(self._inflight)
        if delta < 0:
            self._room.set()
            self._admission.arrived.set()  # a freed slot is news for the loop too

    def _dispatched(self, pending: Pending, now_s: float) -> None:
        """Record one request leaving the queue at ``now_s``: its wait, by tier."""
        metrics = self._metrics
        pending.released_s = now_s
        wait_s = now_s - pending.arrival_s
        metrics.child(metrics.queue_wait, self._model, pending.tier).observe(wait_s)
        # budgets are to the first token: a stream's is timed when it comes (``_first_token``, or
        # ``_resolve`` for one that ends without any); for any other request it is its wait plus the
        # engine's measured time to first token (an estimate)
        if pending.outputs is None:
            self._count_if_late(pending, wait_s + self.load.ttft_s)
        self._running[id(pending)] = pending

    def _budget_s(self, tier: Tier) -> float | None:
        """The wait a tier allows (None: no budget is kept on this shape)."""
        return None

    def _count_if_late(self, pending: Pending, first_token_after_s: float) -> None:
        """A budget miss when the first token came (or would come) later than the tier's budget."""
        budget_s = self._budget_s(pending.tier)
        if budget_s is not None and first_token_after_s > budget_s:
            self._metrics.child(self._metrics.budget_misses, self._model, pending.tier).inc()

    def _first_token(self, pending: Pending) -> None:
        """A stream's first output came from the engine now: the tier's time to first token (from
        arrival), a budget miss if late, and the controller's estimate of the engine's own (from
        release)."""
        pending.first_token_seen = True
        now = self._clock.now()
        ttft_s = now - pending.arrival_s
        self._metrics.child(self._metrics.ttft, self._model, pending.tier).observe(ttft_s)
        self._count_if_late(pending, ttft_s)
        if pending.released_s is not None:
            self.load.first_token(now - pending.released_s)

    def _stream_sink(self, pending: Pending) -> Emit | None:
        """Where a static engine emits a streamed request's outputs: its stream (merged until taken),
        the first one timed."""
        outputs = pending.outputs
        if outputs is None:
            return None

        def sink(output: EngineOutput) -> None:
            if not pending.first_token_seen:
                self._first_token(pending)
            outputs.put_nowait(output)

        return sink

    def _span(self, pending: Pending, account: EnergyAccount) -> Span:
        """The request's energy span, on the energy account of the GPUs that run it."""
        return account.begin(pending.request.id, pending.sequences, tier=pending.tier)

    def _timeout(self) -> BackendTimeout:
        return BackendTimeout(f"the engine did not finish within backend.request_timeout_s={self._timeout_s}")

    def _resolve(
        self,
        pending: Pending,
        account: EnergyAccount,
        span: Span,
        result: GenerationResult | BaseException,
        dispatched_s: float,
        group_size: int,
        in_flight: int | None = None,
    ) -> None:
        """End the request's energy span on its ``account`` and resolve its future: the one place both
        happen. ``in_flight``: the sequences on the request's engine (its replica; None: the dispatcher's
        own count), for the estimate of a request that ended without the engine's count."""
        self._running.pop(id(pending), None)
        self._admission.observe_done()
        if pending.outputs is not None and not pending.first_token_seen:
            # a stream that ended without a first token: a miss if its budget ran out meanwhile
            self._count_if_late(pending, self._clock.now() - pending.arrival_s)
        delivered = not pending.future.done()
        running = self._inflight if in_flight is None else in_flight
        answer: Outcome | EcobatchError
        if isinstance(result, GenerationResult):
            charge = account.end(
                span,
                pending.request,
                result.usage,
                delivered=delivered,
                dispatched_s=dispatched_s,
                in_flight=running,
            )
            answer = self._served(pending, result, charge, dispatched_s, group_size)
        else:
            account.end(span, pending.request, None, dispatched_s=dispatched_s, in_flight=running)
            answer = as_error(result)
        if delivered and not pending.future.done():
            if isinstance(answer, Outcome):
                pending.future.set_result(answer)
            else:
                pending.future.set_exception(answer)

    def _served(
        self, pending: Pending, result: GenerationResult, charge: Charge, dispatched_s: float, group_size: int
    ) -> Outcome:
        """A request served with the engine's count: its tokens counted, the live estimates taught, and
        its answer (with the account's provisional figure)."""
        try:  # bookkeeping beside the answer: its failure must not cost the client its result
            self._metrics.observe_tokens(result.usage)
            self._learn(pending, result.usage, dispatched_s, charge.concurrency)
        except Exception:
            log.exception("bookkeeping for request %s failed", pending.request.id)
        return Outcome(
            result,
            dispatched_s - pending.arrival_s,
            group_size,
            charge.provisional_joules,
            charge.source,
            pending.tier,
        )

    def _learn(self, pending: Pending, usage: Usage, dispatched_s: float, concurrency: float) -> None:
        """A request ended with the engine's count: the live estimates learn its length and speed."""
        n = max(pending.sequences, 1)
        self.load.finished(
            max_tokens=pending.request.max_tokens,
            completion_tokens_per_sequence=usage.completion_tokens / n,
            decode_s=self._clock.now() - dispatched_s,
            mean_concurrency=concurrency,
        )
        if pending.request.prompt_tokens is None:
            self.load.prompt_measured(pending.prompt_chars, usage.prompt_tokens)


def as_error(exc: BaseException) -> EcobatchError:
    """An engine's exception as the client's error (anything unexpected is a 502)."""
    return exc if isinstance(exc, EcobatchError) else BackendFailed(f"engine error: {exc!r}")

"""What waits to be dispatched: the bounded queue, its arrival rate and request sizes, and the policy's
decision over them. Shared by the static batcher and the continuous gate.

A request is queued as a ``Pending`` with a future the HTTP handler awaits. A handler whose client
leaves withdraws it (``withdraw`` cancels the future); a cancelled request is dropped before dispatch.
The queue's sequence count is kept as it changes, so holding a window open costs O(1) per arrival.
The window helpers (``deadline_s``, ``collect``) apply the pure rules in ``policy`` on the injected
clock.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .arrivals import ArrivalRate, RecentRate
from .backends.base import Emit
from .clock import Clock
from .config import BatchingSettings
from .domain import Demand, GenerationRequest, GenerationResult, Headroom, Usage
from .errors import BadRequest, Overloaded, ShuttingDown
from .metrics import Metrics
from .policy import Decision, choose_batch_size, should_close, window_length_s
from .profile import EnergyProfile

__all__ = ["Admission", "Outcome", "Pending"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a served request gets back. Its measured joules are settled later (``energy.receipts``);
    ``provisional_joules`` is the profile's model of them, labelled as such wherever it is shown."""

    result: GenerationResult
    queue_wait_s: float
    group_size: int
    provisional_joules: float
    energy_source: str


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


class Admission:
    def __init__(
        self,
        settings: BatchingSettings,
        profile: EnergyProfile,
        metrics: Metrics,
        *,
        model: str,
        headroom: Callable[[], Headroom],
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.settings_version = 0
        self.clock = clock
        self.queue: deque[Pending] = deque()
        self.queued_sequences = 0  # Σ sequences in ``queue``
        self._withdrawn = False  # a future was cancelled since the last sweep of the queue
        self.arrived = asyncio.Event()
        self.closing = False
        self.last_decision: Decision | None = None
        self._profile = profile
        self._metrics = metrics
        self._model = model
        self._headroom = headroom
        self._rate = ArrivalRate()
        self._done_rate = RecentRate()  # completions per second: how fast the queue drains
        self._demand = _Demand(settings.expected_prompt_tokens, settings.expected_completion_tokens)

    def reconfigure(self, settings: BatchingSettings) -> None:
        self.settings = settings
        self.settings_version += 1
        self.arrived.set()

    # ---- queue ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Emit | None) -> Pending:
        if self.closing:
            raise ShuttingDown("ecobatch is shutting down; retry on another replica")
        if request.sequences > self.settings.max_batch_size:
            raise BadRequest(
                f"'prompt' holds {request.sequences} prompts; this server takes at most "
                f"batching.max_batch_size={self.settings.max_batch_size} in one request",
                param="prompt",
            )
        if len(self.queue) >= self.settings.max_queue:
            self.drop_cancelled()  # requests whose clients left hold no place in the queue
        if len(self.queue) >= self.settings.max_queue:
            raise Overloaded(
                f"queue is full: {len(self.queue)} requests, batching.max_queue="
                f"{self.settings.max_queue}; retry later",
                retry_after_s=self._retry_after_s(),
            )
        now = self.clock.now()
        pending = Pending(request, asyncio.get_running_loop().create_future(), now, emit)
        self.queue.append(pending)
        self.queued_sequences += request.sequences
        self._rate.observe(now)
        self._publish_depth()
        self.arrived.set()
        return pending

    def _retry_after_s(self) -> float:
        """How long until the queue has room again, from the measured drain rate (completions per
        second); before any completion, the policy's expected latency. Between 1 and 60 s."""
        drain_per_s = self._done_rate.per_s(self.clock.now())
        if drain_per_s > 0:
            wait_s = len(self.queue) / drain_per_s
        else:
            wait_s = self.last_decision.expected_latency_s if self.last_decision else 1.0
        return float(min(60, max(1, math.ceil(wait_s))))

    def observe_done(self) -> None:
        """A request left the engine (served or failed)."""
        self._done_rate.observe(self.clock.now())

    def _publish_depth(self) -> None:
        self._metrics.child(self._metrics.queue_depth, self._model).set(len(self.queue))

    def withdraw(self, pending: Pending) -> None:
        """The client left: cancel the request's future; if it is still queued it will not run."""
        pending.future.cancel()
        self._withdrawn = True

    def drop_cancelled(self) -> None:
        """Sweep withdrawn requests out of the queue (a future cancelled without ``withdraw`` is
        skipped when it reaches the head)."""
        if not self._withdrawn:
            return
        self._withdrawn = False
        kept = deque(p for p in self.queue if not p.future.done())
        if len(kept) != len(self.queue):
            self.queue = kept
            self.queued_sequences = sum(p.request.sequences for p in kept)
            self._publish_depth()

    async def wait_for_work(self) -> None:
        """Return once the queue holds a request whose client is still there."""
        self.drop_cancelled()
        while not self.queue:
            self.arrived.clear()
            await self.arrived.wait()
            self.drop_cancelled()

    def head(self) -> Pending | None:
        """The first queued request whose client is still there (requests withdrawn ahead of it are
        dropped), or None."""
        self.drop_cancelled()
        while self.queue and self.queue[0].future.done():
            self.queued_sequences -= self.queue.popleft().request.sequences
            self._publish_depth()
        return self.queue[0] if self.queue else None

    def take(
        self, room: int, fits: Callable[[Sequence[GenerationRequest]], bool] | None = None
    ) -> list[Pending]:
        """Up to ``room`` sequences from the head of the queue, in order; the head always goes. With
        ``fits``, stop at the first request that would make the group not fit (it heads the next one)."""
        self.drop_cancelled()
        group: list[Pending] = []
        requests: list[GenerationRequest] = []  # the group's requests, plus the head on trial
        taken = 0
        while self.queue:
            head = self.queue[0]
            n = head.request.sequences
            if head.future.done():  # cancelled while queued
                self.queue.popleft()
                self.queued_sequences -= n
                continue
            if group and taken + n > room:
                break
            requests.append(head.request)
            if group and fits is not None and not fits(requests):
                break
            group.append(self.queue.popleft())
            self.queued_sequences -= n
            taken += n
        self._publish_depth()
        return group

    def fail_queued(self, error: BaseException) -> None:
        while self.queue:
            pending = self.queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)
        self.queued_sequences = 0
        self._publish_depth()

    # ---- decisions -----------------------------------------------------------------------------
    def decide(self, inflight: int, window_s: float = 0.0, headroom: Headroom | None = None) -> Decision:
        """The policy's choice for an engine with ``inflight`` sequences running (``headroom``: that
        engine's KV headroom, where it is not the one admission was built with: a replica's)."""
        s = self.settings
        decision = choose_batch_size(
            self._profile,
            headroom if headroom is not None else self._headroom(),
            self._demand.now(),
            slo_s=s.slo_ms / 1000.0,
            max_batch_size=s.max_batch_size,
            energy_tolerance=s.energy_tolerance,
            inflight=inflight,
            window_s=window_s,
        )
        self.last_decision = decision
        self._metrics.child(self._metrics.policy_batch_size, self._model).set(decision.batch_size)
        return decision

    def deadline_s(self, decision: Decision) -> float:
        """When the window that opened at the head's arrival closes (``policy.window_length_s``)."""
        s = self.settings
        opened_s = self.queue[0].arrival_s
        now = self.clock.now()
        slack_s = s.slo_ms / 1000.0 - decision.expected_latency_s - (now - opened_s)
        return opened_s + window_length_s(
            arrival_rate_per_s=self._rate.per_s(now),
            target=decision.batch_size,
            window_min_s=s.window_min_ms / 1000.0,
            window_max_s=s.window_max_ms / 1000.0,
            slo_slack_s=slack_s,
        )

    async def collect(self, target: int, deadline_s: float) -> bool:
        """Hold the window open until ``policy.should_close``: True. False when the queue emptied or the
        settings changed meanwhile (the caller decides again)."""
        opened_s = self.queue[0].arrival_s if self.queue else self.clock.now()
        version = self.settings_version
        while True:
            self.drop_cancelled()
            if not self.queue or self.settings_version != version:
                return False
            now = self.clock.now()
            if should_close(
                now_s=now,
                deadline_s=deadline_s,
                collected=self.queued_sequences,
                target=target,
                arrival_rate_per_s=self._rate.per_s(now),
            ):
                break
            self.arrived.clear()
            await self.clock.wait(self.arrived, deadline_s)
        self._metrics.child(self._metrics.window, self._model).observe(max(0.0, self.clock.now() - opened_s))
        return True

    def observe_demand(self, usage: Usage, sequences: int) -> None:
        per_seq = max(sequences, 1)
        self._demand.observe(usage.prompt_tokens / per_seq, usage.completion_tokens / per_seq)

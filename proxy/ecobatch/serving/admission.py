"""What waits to be dispatched: the bounded queue, one line per tier, shared by the static batcher and the
continuous gate.

A request is queued as a ``Pending`` with a future the HTTP handler awaits (a streamed one also with the
stream of its outputs, which ends once the future is done), its tier (``service_tier``), and what the
live load estimates predict of it (generated tokens, KV tokens at its end). A handler whose client
leaves withdraws it (``withdraw`` cancels the future); a cancelled request is dropped before dispatch.
The queue's sequence count is kept as it changes, so holding a window open costs O(1) per arrival. Each
tier's line is in arrival order, which is also its budget order.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import msgspec

from ..clock import Clock
from ..config import BatchingSettings
from ..domain import TIERS, GenerationRequest, GenerationResult, Tier
from ..errors import BadRequest, Overloaded, ShuttingDown
from .arrivals import ArrivalRate, RecentRate
from .load import LoadTracker
from .metrics import Metrics
from .stream import OutputStream

__all__ = ["Admission", "Outcome", "Pending", "prompt_characters"]


class Outcome(msgspec.Struct, frozen=True):
    """What a served request gets back. Its measured joules are settled later (``energy.receipts``);
    ``provisional_joules`` is the profile's model of them, labelled as such wherever it is shown."""

    result: GenerationResult
    queue_wait_s: float
    group_size: int
    provisional_joules: float
    energy_source: str
    tier: Tier = "interactive"


@dataclass(eq=False, slots=True)
class Pending:
    request: GenerationRequest
    future: asyncio.Future[Outcome]
    arrival_s: float
    #: a streamed request's outputs on their way to its handler (closed once the future is done)
    outputs: OutputStream | None
    #: the tier it is served in (``flex`` on a static engine is served as ``interactive``)
    tier: Tier
    sequences: int
    #: predicted at arrival: generated tokens and KV tokens at its end, all its sequences together
    output_tokens: float
    kv_tokens: float
    prompt_chars: int
    released_s: float | None = None
    #: a stream's first token came (its budget was checked then)
    first_token_seen: bool = False


def prompt_characters(request: GenerationRequest) -> int:
    """The characters of a request's prompts (or its messages' text): what a length estimate starts from."""
    if request.kind == "completion":
        return sum(len(p) for p in request.prompts)
    total = 0
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, Mapping))
    return total


class Admission:
    def __init__(
        self,
        settings: BatchingSettings,
        metrics: Metrics,
        *,
        model: str,
        clock: Clock,
        load: LoadTracker,
        max_prompts_per_request: int,
        tiers: frozenset[Tier] = frozenset(TIERS),
    ) -> None:
        self.settings = settings
        self.settings_version = 0
        self.clock = clock
        self.load = load
        self.queues: dict[Tier, deque[Pending]] = {tier: deque() for tier in TIERS}
        self.queued = 0  # requests in the queues
        self.queued_sequences = 0  # Σ sequences in the queues
        self._withdrawn = False  # a future was cancelled since the last sweep of the queue
        self.arrived = asyncio.Event()
        self.closing = False
        self._tiers = tiers
        self._max_prompts = max_prompts_per_request
        self._done_rate = RecentRate()  # completions per second: how fast the queue drains
        #: the static window's arrival rate (an EWMA of gaps: arrivals at one instant read as a burst)
        self.arrival_rate = ArrivalRate()
        #: the event loop its futures belong to: found once, on the first request (each look-up asks the
        #: system for the process id)
        self._loop: asyncio.AbstractEventLoop | None = None
        for tier in TIERS:  # each tier's depth is read when the metrics are scraped, not kept up per change
            metrics.child(metrics.queue_depth, model, tier).set_function(partial(self._depth, tier))

    def reconfigure(self, settings: BatchingSettings) -> None:
        self.settings = settings
        self.settings_version += 1
        self.arrived.set()

    # ---- queue ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Pending:
        if self.closing:
            raise ShuttingDown("ecobatch is shutting down; retry on another replica")
        if request.sequences > self._max_prompts:
            raise BadRequest(
                f"'prompt' holds {request.sequences} prompts; this server takes at most "
                f"server.max_prompts_per_request={self._max_prompts} in one request",
                param="prompt",
            )
        if self.queued >= self.settings.max_queue:
            self.drop_cancelled()  # requests whose clients left hold no place in the queue
        if self.queued >= self.settings.max_queue:
            raise Overloaded(
                f"queue is full: {self.queued} requests, batching.max_queue="
                f"{self.settings.max_queue}; retry later",
                retry_after_s=self._retry_after_s(),
            )
        now = self.clock.now()
        tier: Tier = request.tier if request.tier in self._tiers else "interactive"
        n = request.sequences
        per_sequence = self.load.predict_output_tokens(request.max_tokens)
        chars = prompt_characters(request)
        if request.prompt_tokens is not None:
            prompt = float(sum(request.prompt_tokens))
        else:
            prompt = self.load.predict_prompt_tokens(chars)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        outputs = None
        if request.stream:
            outputs = OutputStream()
            future.add_done_callback(_closer(outputs))
        pending = Pending(
            request,
            future,
            now,
            outputs,
            tier,
            n,
            per_sequence * n,
            prompt + per_sequence * n,
            chars,
        )
        self.queues[tier].append(pending)
        self.queued += 1
        self.queued_sequences += n
        self.load.arrived(now, tier, per_sequence, pending.kv_tokens / n)
        self.arrival_rate.observe(now)
        self.arrived.set()
        return pending

    def _retry_after_s(self) -> float:
        """How long until the queue has room again, from the measured drain rate (completions per
        second); before any completion, 1 s. Between 1 and 60 s."""
        drain_per_s = self._done_rate.per_s(self.clock.now())
        wait_s = self.queued / drain_per_s if drain_per_s > 0 else 1.0
        return float(min(60, max(1, math.ceil(wait_s))))

    def observe_done(self) -> None:
        """A request left the engine (served or failed)."""
        self._done_rate.observe(self.clock.now())

    def _depth(self, tier: Tier) -> int:
        return len(self.queues[tier])

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
        for tier, queue in self.queues.items():
            kept = deque(p for p in queue if not p.future.done())
            if len(kept) != len(queue):
                self.queued -= len(queue) - len(kept)
                self.queued_sequences -= sum(p.sequences for p in queue if p.future.done())
                self.queues[tier] = kept

    def _drop_done_heads(self) -> None:
        for queue in self.queues.values():
            while queue and queue[0].future.done():
                gone = queue.popleft()
                self.queued -= 1
                self.queued_sequences -= gone.sequences

    async def wait_for_work(self) -> None:
        """Return once the queue holds a request whose client is still there."""
        self.drop_cancelled()
        self._drop_done_heads()
        while not self.queued:
            self.arrived.clear()
            await self.arrived.wait()
            self.drop_cancelled()
            self._drop_done_heads()

    def waiting(self) -> Mapping[Tier, Sequence[Pending]]:
        """Each tier's line, in arrival order, without the requests whose clients left."""
        self.drop_cancelled()
        self._drop_done_heads()
        return self.queues

    def remove(self, pending: Pending) -> None:
        """``pending`` leaves its line (released)."""
        queue = self.queues[pending.tier]
        if queue and queue[0] is pending:
            queue.popleft()
        else:
            queue.remove(pending)
        self.queued -= 1
        self.queued_sequences -= pending.sequences

    def in_order(self) -> Iterator[Pending]:
        """Every queued request whose client is still there: priority first, then the others in order."""
        for tier in TIERS:
            for pending in self.queues[tier]:
                if not pending.future.done():
                    yield pending

    def oldest_arrival_s(self) -> float | None:
        """When the longest-waiting request arrived (None: nothing waits)."""
        heads = [q[0].arrival_s for q in self.queues.values() if q]
        return min(heads) if heads else None

    def take(
        self, room: int, fits: Callable[[Sequence[GenerationRequest]], bool] | None = None
    ) -> list[Pending]:
        """Up to ``room`` sequences from the front of the queue (priority first), in order; the first
        always goes. With ``fits``, stop at the first request that would make the group not fit (it heads
        the next one)."""
        group: list[Pending] = []
        requests: list[GenerationRequest] = []  # the group's requests, plus the next one on trial
        taken = 0
        for pending in list(self.in_order()):
            n = pending.sequences
            if group and taken + n > room:
                break
            requests.append(pending.request)
            if group and fits is not None and not fits(requests):
                break
            self.remove(pending)
            group.append(pending)
            taken += n
        self._drop_done_heads()
        return group

    def fail_queued(self, error: BaseException) -> None:
        for queue in self.queues.values():
            while queue:
                pending = queue.popleft()
                if not pending.future.done():
                    pending.future.set_exception(error)
        self.queued = self.queued_sequences = 0


def _closer(outputs: OutputStream) -> Callable[[asyncio.Future[Outcome]], None]:
    def close(_: asyncio.Future[Outcome]) -> None:
        outputs.close()

    return close

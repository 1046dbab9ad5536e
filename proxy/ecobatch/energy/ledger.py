"""The energy ledger: splits each metered interval's joules among the requests in flight in it.

Off the request path: dispatchers report "request started / made progress / ended" (``begin``,
``Span.generated``, ``Span.end``) and the meter reports intervals of the energy counter
(``add_interval``). Nothing here awaits anything, and a response never waits for the ledger.

Attribution rule, for one interval [t0, t1) holding ``joules``:

1. **busy time** is the union of the in-flight lifetimes of ecobatch's requests within the interval;
   **idle** is the rest of the interval, charged at the idle power measured at start-up (never more
   than the interval holds) to the idle bucket.
2. If none of ecobatch's requests was in flight, the joules beyond idle power × time belong to work
   ecobatch did not send (another client of the same GPU): the **unattributed** bucket, never idle.
   Where ours were in flight, they take at most busy time × ``max_power_w`` (the GPUs' power limit):
   more than that was drawn while ours were not running, so it is another client's too.
3. Otherwise the rest (active joules) is split among the requests in flight by the **tokens each
   processed inside the interval**, a prompt token weighing ``prefill_weight`` generated tokens.
   Where a request's tokens happened in time:

   * reported progress (streams: chunk times; in-process engines: each step's tokens): the prompt and
     the first chunk's tokens fall between the start and the first chunk, every later chunk's tokens
     between the previous chunk and it; the engine's final usage rescales the chunk counts;
   * no progress (a non-streaming request to a remote engine): the prompt at the start, the generated
     tokens spread evenly over the request's lifetime.

   If no request processed a token in the interval, the active joules are split by in-flight time ×
   sequences.

So Σ per-request joules + idle + unattributed = Σ interval joules = the counter's delta, exactly (tested).
An interval is settled once every request in flight in it has ended (its token timeline is known); a
request is settled, and reported through ``on_request``, once the intervals up to its end are. Work
per interval is proportional to the requests in it; a backlog (behind one long request) is settled at
most ``settle_budget`` intervals per turn of the event loop, and settled requests are reported at most
``report_budget`` per turn, so that a busy interval does not stall every response for milliseconds.
A span of time in which the counter could not be read (``add_gap``) moves no joules; the requests in
it settle flagged incomplete.

A modelled meter passes ``joules=None``: the interval's joules are then the model's (idle power × idle
time + the profile's J/token at the interval's mean concurrency × the tokens generated in it).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..clock import Clock, MonotonicClock
from ..domain import Usage
from .attribution import ActiveModel, InFlight, IntervalSplit, split_interval

__all__ = ["Ledger", "LedgerTotals", "SettledRequest", "Span"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SettledRequest:
    request_id: str
    joules: float
    source: str
    usage: Usage
    delivered: bool
    start_s: float
    end_s: float
    #: False when the counter could not be read for part of the request's life: ``joules`` is then
    #: what was measured, an underestimate
    complete: bool = True
    tier: str = "interactive"


@dataclass(slots=True)
class LedgerTotals:
    """Running sums since start-up, in joules (``unmeasured_s``: seconds the counter was unreadable)."""

    counter_joules: float = 0.0
    idle_joules: float = 0.0
    unattributed_joules: float = 0.0
    attributed_joules: float = 0.0
    settled_request_joules: float = 0.0
    unmeasured_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Interval:
    t0_s: float
    t1_s: float
    joules: float | None  # None: modelled
    gap: bool


# (start, end, prompt tokens, generated tokens): a stretch of time in which a request processed tokens
_Segment = tuple[float, float, float, float]


@dataclass(eq=False, slots=True)
class _Record:
    request_id: str
    sequences: int
    start_s: float
    seq_seconds_at_start: float
    end_s: float | None = None
    usage: Usage = field(default_factory=Usage)
    delivered: bool = True
    events: list[tuple[float, int]] = field(default_factory=list)
    segments: list[_Segment] = field(default_factory=list)
    cursor: int = 0
    joules: float = 0.0
    complete: bool = True
    tier: str = "interactive"

    def close(self, end_s: float, usage: Usage | None) -> None:
        self.end_s = end_s
        seen = sum(n for _, n in self.events)
        completion = usage.completion_tokens if usage is not None else seen
        prompt = usage.prompt_tokens if usage is not None else 0
        self.usage = Usage(prompt, completion)
        if self.events and seen > 0:
            scale = completion / seen
            previous = self.start_s
            for k, (t, n) in enumerate(self.events):
                self.segments.append((previous, t, prompt if k == 0 else 0, n * scale))
                previous = t
        else:
            self.segments = [(self.start_s, self.start_s, prompt, 0), (self.start_s, end_s, 0, completion)]
        self.events = []

    def settled(self, source: str) -> SettledRequest:
        assert self.end_s is not None
        return SettledRequest(
            self.request_id,
            self.joules,
            source,
            self.usage,
            self.delivered,
            self.start_s,
            self.end_s,
            self.complete,
            self.tier,
        )

    def tokens_in(self, t0: float, t1: float) -> tuple[float, float]:
        """(prompt, generated) tokens this request processed in [t0, t1). Intervals come in order, so a
        cursor skips the segments already passed."""
        prompt = decode = 0.0
        i, segments = self.cursor, self.segments
        while i < len(segments):
            a, b, p, d = segments[i]
            if a >= t1:
                break
            if b <= a:  # an instant: it belongs to the interval holding it
                if a >= t0:
                    prompt, decode = prompt + p, decode + d
                i += 1
                continue
            share = max(0.0, min(b, t1) - max(a, t0)) / (b - a)
            prompt, decode = prompt + p * share, decode + d * share
            if b > t1:
                break
            i += 1
        self.cursor = i
        return prompt, decode


class Span:
    """One request's handle in the ledger. ``end`` is idempotent, so ``finally`` blocks can always call it."""

    __slots__ = ("_ledger", "_record")

    def __init__(self, ledger: Ledger, record: _Record) -> None:
        self._ledger, self._record = ledger, record

    @property
    def request_id(self) -> str:
        return self._record.request_id

    @property
    def source(self) -> str:
        """Where its ledger's joules come from (``nvml``, ``dcgm``, ``model``)."""
        return self._ledger.source

    def generated(self, tokens: int) -> None:
        """``tokens`` generated tokens came out now."""
        if self._record.end_s is None and tokens > 0:
            self._record.events.append((self._ledger.clock.now(), tokens))

    def end(self, usage: Usage | None, *, delivered: bool = True) -> float:
        """Close the span (``usage=None``: the engine's count is unknown, e.g. it failed); return the mean
        number of sequences in flight over its lifetime (for a provisional estimate)."""
        return self._ledger._end(self._record, usage, delivered)

    def abandon(self) -> None:
        """The request never reached this ledger's GPUs (its connection was refused): forget the span,
        so that it takes no share of their joules and files no receipt (it runs elsewhere)."""
        self._ledger._abandon(self._record)

    @property
    def tokens_seen(self) -> int:
        """Generated tokens reported by ``generated`` so far (a stream's chunks)."""
        return sum(n for _, n in self._record.events)


class _Requests:
    """The requests' side of the ledger: records not yet reported, in start order; the open ones by
    start (a heap); the sequences in flight and their time integral (for mean concurrency)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.live: deque[_Record] = deque()
        self._open: list[tuple[float, int, _Record]] = []
        self._count = 0
        self.inflight_sequences = 0
        self._seq_seconds = 0.0
        self._seq_seconds_at_s = clock.now()

    def _advance(self) -> float:
        now = self.clock.now()
        self._seq_seconds += self.inflight_sequences * max(0.0, now - self._seq_seconds_at_s)
        self._seq_seconds_at_s = now
        return now

    def begin(self, request_id: str, sequences: int, tier: str) -> _Record:
        now = self._advance()
        self.inflight_sequences += sequences
        record = _Record(request_id, max(1, sequences), now, self._seq_seconds, tier=tier)
        self.live.append(record)
        self._count += 1
        heapq.heappush(self._open, (now, self._count, record))
        return record

    def end(self, record: _Record, usage: Usage | None, delivered: bool) -> float:
        """Close ``record``; return its mean sequences in flight (itself included) over its life."""
        now = self._advance()
        self.inflight_sequences -= record.sequences
        record.delivered = delivered
        record.close(now, usage)
        duration = now - record.start_s
        if duration <= 0:
            return float(self.inflight_sequences + record.sequences)
        return (self._seq_seconds - record.seq_seconds_at_start) / duration

    def abandon(self, record: _Record) -> None:
        """Take ``record`` out as if it had never begun: no busy time, no share, never reported."""
        self._advance()
        self.inflight_sequences -= record.sequences
        record.end_s = record.start_s
        record.events = []
        if record in self.live:
            self.live.remove(record)

    def earliest_open_start(self) -> float | None:
        while self._open and self._open[0][2].end_s is not None:
            heapq.heappop(self._open)
        return self._open[0][0] if self._open else None

    def started_before(self, t_s: float) -> list[_Record]:
        """Take the records that started before ``t_s`` off the front (``keep`` puts some back)."""
        taken = []
        while self.live and self.live[0].start_s < t_s:
            taken.append(self.live.popleft())
        return taken

    def keep(self, records: list[_Record]) -> None:
        for record in reversed(records):
            self.live.appendleft(record)


class Ledger:
    def __init__(
        self,
        *,
        source: str,
        gpu: str,
        prefill_weight: float,
        idle_power_w: float = 0.0,
        max_power_w: float | None = None,
        clock: Clock | None = None,
        active_model: ActiveModel | None = None,
        settle_budget: int = 16,
        report_budget: int = 128,
    ) -> None:
        self.source, self.gpu = source, gpu
        self.prefill_weight = prefill_weight
        self.idle_power_w = idle_power_w
        #: the most the GPUs can draw (their power limits): while ours run, joules beyond busy time ×
        #: this are another client's (None: no cap)
        self.max_power_w = max_power_w
        self.clock: Clock = clock or MonotonicClock()
        self._active_model = active_model
        self._settle_budget = settle_budget
        self._report_budget = report_budget
        self._outbox: deque[_Record] = deque()  # settled, not yet reported
        self._requests = _Requests(self.clock)
        self._intervals: deque[_Interval] = deque()
        self._continuation_scheduled = False
        self.totals = LedgerTotals()
        self.on_request: Callable[[SettledRequest], None] = lambda settled: None
        self.on_interval: Callable[[IntervalSplit], None] = lambda split: None

    # ---- request events ------------------------------------------------------------------------
    def begin(self, request_id: str, sequences: int = 1, tier: str = "interactive") -> Span:
        return Span(self, self._requests.begin(request_id, sequences, tier))

    def _end(self, record: _Record, usage: Usage | None, delivered: bool) -> float:
        if record.end_s is not None:
            return 0.0
        concurrency = self._requests.end(record, usage, delivered)
        self._settle()
        return concurrency

    def _abandon(self, record: _Record) -> None:
        if record.end_s is None:
            self._requests.abandon(record)
            self._settle()

    @property
    def inflight_sequences(self) -> int:
        return self._requests.inflight_sequences

    @property
    def pending_requests(self) -> int:
        """Requests in flight, or ended but not yet settled and reported."""
        return len(self._requests.live) + len(self._outbox)

    @property
    def pending_intervals(self) -> int:
        return len(self._intervals)

    # ---- intervals -----------------------------------------------------------------------------
    def add_interval(self, t0_s: float, t1_s: float, joules: float | None) -> None:
        """The meter's counter moved by ``joules`` in [t0_s, t1_s) (None: a modelled meter)."""
        self._add(_Interval(t0_s, t1_s, joules, gap=False))

    def add_gap(self, t0_s: float, t1_s: float) -> None:
        """The counter could not be read over [t0_s, t1_s): the requests in it settle as incomplete."""
        self._add(_Interval(t0_s, t1_s, 0.0, gap=True))

    def _add(self, interval: _Interval) -> None:
        if interval.t1_s < interval.t0_s:
            raise ValueError(f"interval [{interval.t0_s}, {interval.t1_s}) runs backwards")
        self._intervals.append(interval)
        self._settle()

    def flush(self) -> None:
        """At shutdown: end whatever is still open (usage unknown), settle every interval, and report
        every request (those past the last interval with what they have)."""
        for record in list(self._requests.live):
            if record.end_s is None:
                self._end(record, None, False)
        self._settle(budget=0)
        while self._requests.live:
            self._report(self._requests.live.popleft())

    def _settle(self, budget: int | None = None) -> None:
        """Settle intervals in order while no open request began before their end, then report the
        requests they settled; at most ``budget`` intervals (default: the ledger's) and
        ``report_budget`` requests per call, the rest on the next turn of the event loop (``budget=0``:
        everything now)."""
        budget = self._settle_budget if budget is None else budget
        done = 0
        while self._intervals:
            interval = self._intervals[0]
            blocker = self._requests.earliest_open_start()
            if blocker is not None and blocker < interval.t1_s:
                break
            if budget and done >= budget:
                self._continue_later()
                break
            self._intervals.popleft()
            self._settle_one(interval)
            done += 1
        reported = 0
        while self._outbox:
            if budget and reported >= self._report_budget:
                self._continue_later()
                return
            self._report(self._outbox.popleft())
            reported += 1

    def _continue_later(self) -> None:
        if self._continuation_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: finish now
            self._settle(budget=0)
            return
        self._continuation_scheduled = True

        def resume() -> None:
            self._continuation_scheduled = False
            self._settle()

        loop.call_soon(resume)

    def _settle_one(self, interval: _Interval) -> None:
        t0, t1 = interval.t0_s, interval.t1_s
        prefix = self._requests.started_before(t1)  # all ended: no open request blocks this interval
        inside = [r for r in prefix if _overlaps(r, t0)]
        if interval.gap:
            for r in inside:
                r.complete = False
            self.totals.unmeasured_s += t1 - t0
            self._observe(IntervalSplit(t0, t1, 0.0, 0.0, 0.0, 0.0, 0.0, gap=True))
        else:
            self._split(t0, t1, interval.joules, inside)
        self._requests.keep([r for r in prefix if r.end_s is not None and r.end_s >= t1])
        for record in prefix:
            if record.end_s is not None and record.end_s < t1:
                self._outbox.append(record)

    def _split(self, t0: float, t1: float, joules: float | None, inside: list[_Record]) -> None:
        members = []
        for r in inside:
            prompt, generated = r.tokens_in(t0, t1)
            end = r.end_s if r.end_s is not None else t1
            members.append(InFlight(max(r.start_s, t0), min(end, t1), r.sequences, prompt, generated))
        split, shares = split_interval(
            t0,
            t1,
            joules,
            members,
            idle_power_w=self.idle_power_w,
            prefill_weight=self.prefill_weight,
            max_power_w=self.max_power_w,
            active_model=self._active_model,
        )
        for r, share in zip(inside, shares, strict=True):
            r.joules += share
        self.totals.counter_joules += split.joules
        self.totals.idle_joules += split.idle_joules
        self.totals.unattributed_joules += split.unattributed_joules
        self.totals.attributed_joules += split.attributed_joules
        self._observe(split)

    def _observe(self, split: IntervalSplit) -> None:
        try:
            self.on_interval(split)
        except Exception:  # a broken observer must not stop the accounting
            log.exception("energy: the interval observer failed")

    def _report(self, record: _Record) -> None:
        self.totals.settled_request_joules += record.joules
        try:
            self.on_request(record.settled(self.source))
        except Exception:  # a broken observer must not stop (or repeat) the accounting
            log.exception("energy: the request observer failed for %s", record.request_id)


def _overlaps(record: _Record, t0: float) -> bool:
    """Whether an ended record (that started before the interval's end) was in flight in it: it ended
    after the interval began, or it is an instant inside the interval."""
    assert record.end_s is not None
    return record.end_s > t0 or (record.end_s == record.start_s and record.start_s >= t0)

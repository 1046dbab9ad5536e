"""The energy ledger: splits each metered interval's joules among the requests in flight in it.

Off the request path: the replica's energy account (``account.py``) reports "request started / ended"
(``begin``, ``Span.end``: the engine's count, or its estimate of one) and the engine's outputs their
generated tokens as they come (``Span.generated``); the meter reports intervals of the energy counter
(``add_interval``) and the facts it measures (``set_idle_power``, ``adopt_power_limit``). The ledger
reports back to where it was told at construction (``LedgerReports``: its account): each interval's
split, and the requests it settled. Nothing here awaits anything, and a response never waits for the
ledger.

Attribution rule (``attribution.py`` states it in full): a request is charged the energy the GPU drew
**above its idle power** while the request was in flight, shared with the requests beside it by the
work each did there; idle power × all time is the **idle** bucket (the cost of having the GPU on);
above-idle energy while none of ours ran is **other work** (another client's), except in the ``tail_s``
after a request's end, which is still that request's (the power's decay, and any of the counter's lag
the meter does not undo).
Each request is also told its **base** share: idle power while it was in flight, split by in-flight
time × sequences (charge + base is a full-cost view).

Work is weighed per interval: a generated token weighs 1, a prompt token ``prefill_weight(c)`` at the
interval's mean concurrency c (the profile's measured prefill and decode energy per token, else a
constant). Where a request's tokens happened in time:

* token times reported (streams: chunk times; in-process engines: each step's tokens): the prompt and
  the first chunk's tokens fall between the start and the first chunk, every later chunk's tokens
  between the previous chunk and it; the engine's final usage rescales the chunk counts;
* no token times (a non-streaming request to a remote engine): the prompt over its **prefill**, the
  generated tokens spread evenly from the prefill's end to the request's end. The prefill is placed by
  a first-come queue at the profile's measured prefill rate (``prefill_tokens_per_s``): a request's
  prefill starts at its start or when the prompts that started before it are through, whichever is
  later, and takes its prompt tokens / the rate; a request the queue could not have served by its end
  has its prefill just before its end (it was served by then), and a streamed request's prefill ends by
  its first chunk. Before its turn a request has no tokens in an interval (it still shares one where
  nobody has tokens, by in-flight time, and its base share). Without a measured rate, the
  prompt falls at the start. Why: prompts that arrive together are prefilled one after another at a
  high power for as long as their tokens take (four 1,770-token prompts: ~170 ms on an H200); put at
  one instant, their energy drawn after it went to the requests decoding beside them (replayed from an
  H200 run: ``benchmarks/ledger_replay.py``, docs/energy.md).

**Idle power** starts as the meter's start-up probe (or the configured one) and, with ``live_idle``, is
re-estimated from quiet intervals while serving (``idle.py``).

**Measured / modelled / validated.** Measured: the counter's joules per interval, the idle power, the
tokens and their times. Modelled: the split among requests in one interval (by weighted tokens) and,
for a non-streamed request, when its tokens happened. Validated against the GPU's own counter on an
H200 (docs/energy.md, ``benchmarks/results/h200-energy-truth/``, run 4): each class alone within 2.4 %,
other work 0.44 % of the counter; at 12 in flight mixed, prompt-heavy and medium requests are charged
0.99x and 0.98x what they cost alone, decode-heavy ones 1.27x (the mix drew 15.7 % more than its requests
cost alone, and the split gives that to the decoders); **not** met: the classes' cost ratios in a mix
within 10 % of their ratios alone. A receipt (a share) is not the marginal energy a request adds to
steps that run anyway (decode-heavy requests joining a running load were charged 7.7-7.8x what the
counter says they added); each settled request also carries ``marginal_joules``, modelled from the
profile (``marginal.py``): replayed offline on runs 3 and 4's data with the committed profile it sums to
0.94-1.06x the counter's difference for the added requests (0.24-0.27x with an older, flatter curve),
not yet measured live.

So Σ per-request joules + idle + unattributed = Σ interval joules = the counter's delta, exactly (tested):
a bookkeeping identity, true by construction, and no evidence that the split is right.
An interval is settled once every request in flight in it has ended (its token timeline is known); a
request is settled, and reported (``LedgerReports.settled``: the requests one call settled, together),
once the intervals up to its end are. Work per interval is proportional to the requests in it; a
backlog (behind one long request) is settled at most ``settle_budget`` intervals per turn of the event
loop, and settled requests are reported at most ``report_budget`` per turn, so that a busy interval does
not stall every response for milliseconds.
A span of time in which the counter could not be read (``add_gap``) moves no joules; the requests in
it settle flagged incomplete.

A modelled meter passes ``joules=None``: the interval's joules are then the model's (idle power × idle
time + the profile's J/token at the interval's mean concurrency × the tokens generated in it).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..clock import Clock, MonotonicClock
from ..domain import Usage
from .attribution import ActiveModel, InFlight, IntervalSplit, split_interval, union_length
from .idle import IdleEstimator
from .marginal import MarginalModel, marginal_joules

__all__ = [
    "BASES",
    "COUNTER_STEP_S",
    "Ledger",
    "LedgerReports",
    "LedgerTotals",
    "PrefillWeight",
    "SettledRequest",
    "Span",
]

log = logging.getLogger(__name__)


class SettledRequest(msgspec.Struct, frozen=True):
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
    #: the idle power while it was in flight, its share (a full-cost view: ``joules`` + this); never
    #: part of ``joules``
    base_joules: float = 0.0
    #: what the split rests on (``BASES``)
    basis: str = "token_times"
    #: how much of ``joules`` the counter's timing cannot place on either side of the request's start
    #: and end: its above-idle power at each edge × the counter's resolution (``Ledger.set_counter_
    #: resolution``). None where not known (a modelled meter, a counter unreadable for part of its life).
    #: Not in it: the error of the split among requests in flight together (a model; ``basis``)
    uncertainty_joules: float | None = None
    #: what it added to the GPU's energy, modelled from the profile (the power curve over the sequences in
    #: flight beside it, and its prompt's excess over the curve; ``energy.marginal``); not a share, not
    #: part of ``joules``. None: no model
    marginal_joules: float | None = None


#: what a request's joules rest on, most certain first: its tokens' times as they came (a stream, an
#: in-process engine's steps); the engine's count spread evenly over its life (a non-streamed request to
#: a remote engine); no count from the engine (it failed: the tokens seen, or none); the profile's model
#: (no counter); a counter unreadable for part of its life (an underestimate)
BASES = ("token_times", "spread", "no_engine_count", "modelled", "incomplete")


@dataclass(slots=True)
class LedgerTotals:
    """Running sums since start-up, in joules (``unmeasured_s``: seconds the counter was unreadable)."""

    counter_joules: float = 0.0
    idle_joules: float = 0.0
    base_joules: float = 0.0
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
    other_sequences: float = 0.0


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
    base_joules: float = 0.0
    complete: bool = True
    tier: str = "interactive"
    basis: str = "token_times"
    edge_joules: float = 0.0  # what the counter's timing cannot place across its start and end
    marginal_joules: float = 0.0  # what its time in flight added, by the power curve (``energy.marginal``)
    queued: bool = False  # it has taken its turn in the ledger's prefill queue (``queue``)

    def close(self, end_s: float, usage: Usage | None, estimated: bool) -> None:
        self.end_s = end_s
        seen = sum(n for _, n in self.events)
        no_count = usage is None or estimated
        self.basis = "no_engine_count" if no_count else "token_times" if seen > 0 else "spread"
        completion = usage.completion_tokens if usage is not None else seen
        prompt = usage.prompt_tokens if usage is not None else 0
        self.usage = Usage(prompt, completion)
        if self.events and seen > 0:
            scale = completion / seen
            previous = self.start_s
            for k, (t, n) in enumerate(self.events):
                self.segments.append((previous, t, prompt if k == 0 else 0, n * scale))
                previous = t
        self.events = []

    def queue(self, prefill_free_s: float, prefill_tokens_per_s: float | None) -> float:
        """Take this (ended) request's turn in a first-come prefill queue that is free from
        ``prefill_free_s`` on, and return when the queue is free again: never later than the request's
        first token (known with token times) or its end (it was prefilled by then). A request without
        token times gets its segments here: its prompt over its turn, its output after it; a prefill
        its end cut short shares one span with its output, ending at the request's end."""
        assert self.end_s is not None, "a request takes its turn once it has ended"
        self.queued = True
        prompt, completion = self.usage.prompt_tokens, self.usage.completion_tokens
        # segments: built at close from token times, else here
        if prefill_tokens_per_s is None:  # no queue: the prompt at the start
            if not self.segments:
                self.segments = [
                    (self.start_s, self.start_s, prompt, 0),
                    (self.start_s, self.end_s, 0, completion),
                ]
            return prefill_free_s
        prefill_s = prompt / prefill_tokens_per_s
        turn_s = max(self.start_s, prefill_free_s)
        if self.segments:  # token times: its prefill ended by its first chunk
            return min(turn_s + prefill_s, self.segments[0][1])
        if turn_s + prefill_s <= self.end_s:
            prefill_end = turn_s + prefill_s
            self.segments = [(turn_s, prefill_end, prompt, 0), (prefill_end, self.end_s, 0, completion)]
            return prefill_end
        # the queue says it could not be through by its end: it was, so its prefill ran before it
        start = max(self.start_s, self.end_s - prefill_s)
        self.segments = [(start, self.end_s, prompt, completion)]
        return self.end_s

    def settled(
        self, source: str, resolution_s: float | None, marginal: MarginalModel | None
    ) -> SettledRequest:
        assert self.end_s is not None
        added: float | None = None
        if marginal is not None:
            added = self.marginal_joules + marginal.prompt_excess_joules_per_token * self.usage.prompt_tokens
        basis = "incomplete" if not self.complete else "modelled" if source == "model" else self.basis
        known = resolution_s is not None and basis not in ("incomplete", "modelled")
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
            self.base_joules,
            basis,
            self.edge_joules if known else None,
            added,
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

    def end(self, usage: Usage | None, *, delivered: bool = True, estimated: bool = False) -> float:
        """Close the span (``usage=None``: the engine's count is unknown, e.g. it failed, and the tokens
        seen are used; ``estimated``: ``usage`` is an estimate of it, not the engine's count); return the
        mean number of sequences in flight over its lifetime (for a provisional estimate)."""
        return self._ledger._end(self._record, usage, delivered, estimated)

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

    def end(self, record: _Record, usage: Usage | None, delivered: bool, estimated: bool) -> float:
        """Close ``record``; return its mean sequences in flight (itself included) over its life."""
        now = self._advance()
        self.inflight_sequences -= record.sequences
        record.delivered = delivered
        record.close(now, usage, estimated)
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


#: how much more than an interval's length a stepping counter can report in it: NVML's total energy
#: moves in steps; near the power limit (prefill on an H200), a 100 ms interval held more than 100 ms of
#: energy at 700 W and the cap moved the excess to other work (benchmarks/results/h200-energy-truth/,
#: run 2, ``matched-alone-P``)
COUNTER_STEP_S = 0.25
#: a quiet interval longer than this is a counter that stood still, not an idle reading
_QUIET_INTERVAL_MAX_S = 5.0

#: the weight of a prompt token against a generated token's, at a mean concurrency (sequences in flight)
PrefillWeight = Callable[[float], float]


def _ignore(_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class LedgerReports:
    """Where a ledger reports, given at its construction: the requests one call settled (together, in
    order; at most ``report_budget``), and each interval's split (its idle, other work and power)."""

    settled: Callable[[list[SettledRequest]], None] = _ignore
    interval: Callable[[IntervalSplit], None] = _ignore


def _constant(weight: float) -> PrefillWeight:
    def at(concurrency: float) -> float:
        return weight

    return at


class Ledger:
    def __init__(
        self,
        *,
        source: str,
        prefill_weight: float | PrefillWeight,
        idle_power_w: float = 0.0,
        max_power_w: float | None = None,
        clock: Clock | None = None,
        active_model: ActiveModel | None = None,
        settle_budget: int = 16,
        report_budget: int = 128,
        tail_s: float = 0.0,
        live_idle: bool = False,
        reports: LedgerReports | None = None,
        prefill_tokens_per_s: float | None = None,
        marginal: MarginalModel | None = None,
    ) -> None:
        if tail_s < 0:
            raise ValueError(f"{tail_s=} must be >= 0")
        if prefill_tokens_per_s is not None and not prefill_tokens_per_s > 0:
            raise ValueError(f"{prefill_tokens_per_s=} must be > 0 (or None: not measured)")
        #: the engine's prefill rate (the profile's): where requests without token times are prefilled
        self._prefill_tokens_per_s = prefill_tokens_per_s
        self._prefill_free_s = -math.inf  # when the first-come prefill queue is free again
        #: what each request's marginal joules are modelled from (the profile's; None: not reported)
        self._marginal = marginal
        self.source = source
        self._prefill_weight = prefill_weight if callable(prefill_weight) else _constant(prefill_weight)
        #: idle power: the start-up figure, then (``live_idle``) re-estimated from quiet intervals
        self.idle = IdleEstimator(idle_power_w)
        self._live_idle = live_idle and active_model is None
        # the most the GPUs can draw (their power limits): while ours run, joules beyond busy time × this
        # are another client's (None: no cap)
        self._max_power_w = max_power_w
        #: a request's share of the above-idle joules that follow its end (counter lag, power decay)
        self.tail_s = tail_s
        self._resolution_s: float | None = None  # the meter's (set_counter_resolution); None: unknown
        self.clock: Clock = clock or MonotonicClock()
        self._active_model = active_model
        self._settle_budget = settle_budget
        self._report_budget = report_budget
        self._outbox: deque[_Record] = deque()  # settled, not yet reported
        self._requests = _Requests(self.clock)
        self._intervals: deque[_Interval] = deque()
        self._continuation_scheduled = False
        self._last_end_s = float("-inf")  # the latest end of a request settled so far
        self.totals = LedgerTotals()
        self._reports = reports or LedgerReports()

    @property
    def idle_power_w(self) -> float:
        return self.idle.power_w

    def set_idle_power(self, power_w: float) -> None:
        """The idle power measured at start-up (or configured, or the profile's where none could be
        measured): the idle bucket's rate from now on, until the live estimate replaces it."""
        self.idle.power_w = power_w

    @property
    def max_power_w(self) -> float | None:
        """The GPUs' power limit (None: no cap)."""
        return self._max_power_w

    @property
    def counter_resolution_s(self) -> float | None:
        """The counter's timing resolution (None: not known)."""
        return self._resolution_s

    def set_counter_resolution(self, seconds: float) -> None:
        """The counter's timing resolution as the meter sees it (how often it moves, at least the meter's
        sampling interval): each receipt's ``uncertainty_joules`` from now on."""
        if seconds <= 0:
            raise ValueError(f"counter resolution {seconds=} must be > 0")
        self._resolution_s = seconds

    def adopt_power_limit(self, power_w: float | None) -> None:
        """The GPUs' power limit as their counter reports it: the cap from now on, unless one was
        configured (``max_power_w``)."""
        if self._max_power_w is None:
            self._max_power_w = power_w

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """The prefill queue's rate (None: no queue, prompts at their request's start)."""
        return self._prefill_tokens_per_s

    def prefill_weight(self, concurrency: float) -> float:
        return self._prefill_weight(concurrency)

    # ---- request events ------------------------------------------------------------------------
    def begin(self, request_id: str, sequences: int = 1, tier: str = "interactive") -> Span:
        return Span(self, self._requests.begin(request_id, sequences, tier))

    def _end(self, record: _Record, usage: Usage | None, delivered: bool, estimated: bool = False) -> float:
        if record.end_s is not None:
            return 0.0
        concurrency = self._requests.end(record, usage, delivered, estimated)
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
    def add_interval(
        self, t0_s: float, t1_s: float, joules: float | None, other_sequences: float = 0.0
    ) -> None:
        """The meter's counter moved by ``joules`` in [t0_s, t1_s) (None: a modelled meter), while the
        engine ran ``other_sequences`` sequences of another client's (its own count; 0: none or unknown)."""
        self._add(_Interval(t0_s, t1_s, joules, gap=False, other_sequences=other_sequences))

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
        settled = [self._settled(record) for record in self._requests.live]
        self._requests.live.clear()
        self._report(settled)

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
        settled: list[SettledRequest] = []
        while self._outbox:
            if budget and len(settled) >= self._report_budget:
                self._continue_later()
                break
            settled.append(self._settled(self._outbox.popleft()))
        self._report(settled)

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
        t0, t1, tail_s = interval.t0_s, interval.t1_s, self.tail_s
        prefix = self._requests.started_before(t1)  # all ended: no open request blocks this interval
        for r in prefix:  # in start order, each once: the prefill queue's turns
            if not r.queued:
                self._prefill_free_s = r.queue(self._prefill_free_s, self._prefill_tokens_per_s)
        inside = [r for r in prefix if _overlaps(r, t0)]
        if interval.gap:  # the marginal is a model: it needs no counter
            spans = [InFlight(r.start_s, _ended(r), r.sequences, 0.0, 0.0) for r in inside]  # clipped there
            self._add_marginal(t0, t1, inside, spans, interval.other_sequences)
            for r in inside:
                r.complete = False
            self.totals.unmeasured_s += t1 - t0
            self.idle.busy()
            self._observe(IntervalSplit(t0, t1, 0.0, 0.0, 0.0, 0.0, 0.0, gap=True))
        else:
            tail = [] if inside else [r for r in prefix if r.end_s is not None and r.end_s + tail_s > t0]
            self._split(interval, inside, tail)
        for r in inside:
            assert r.end_s is not None
            self._last_end_s = max(self._last_end_s, r.end_s)
        # a request stays (a tail member) until the intervals past its end + tail_s are settled
        self._requests.keep([r for r in prefix if r.end_s is not None and r.end_s + tail_s >= t1])
        for record in prefix:
            if record.end_s is not None and record.end_s + tail_s < t1:
                self._outbox.append(record)

    def _split(self, interval: _Interval, inside: list[_Record], tail: list[_Record]) -> None:
        t0, t1 = interval.t0_s, interval.t1_s
        members = []
        for r in inside:
            prompt, generated = r.tokens_in(t0, t1)
            end = r.end_s if r.end_s is not None else t1
            members.append(InFlight(max(r.start_s, t0), min(end, t1), r.sequences, prompt, generated))
        busy = union_length([(m.start_s, m.end_s) for m in members])
        occupancy = sum((m.end_s - m.start_s) * m.sequences for m in members)
        ours = occupancy / busy if busy > 0 else float(sum(m.sequences for m in members) or 1)
        concurrency = ours + max(0.0, interval.other_sequences)  # the engine's batch: another's too
        split, shares = split_interval(
            t0,
            t1,
            interval.joules,
            members,
            idle_power_w=self.idle.power_w,
            prefill_weight=self._prefill_weight(concurrency),
            max_power_w=self._max_power_w,
            active_model=self._active_model,
            other_sequences=interval.other_sequences,
            tail=[max(r.joules, 0.0) for r in tail],
            cap_slack_s=COUNTER_STEP_S,
        )
        self._add_marginal(t0, t1, inside, members, interval.other_sequences)
        resolution_s = self._resolution_s
        for r, charge, base in zip(inside, shares.charges, shares.bases, strict=True):
            r.joules += charge
            r.base_joules += base
            if resolution_s is not None and charge > 0:
                r.edge_joules += _edge_joules(r, t0, t1, charge, resolution_s)
        for r, charge in zip(tail, shares.tail, strict=True):
            r.joules += charge
        if self._live_idle and interval.joules is not None:
            quiet = not inside and interval.other_sequences <= 0 and t0 >= self._last_end_s + self.tail_s
            # a counter that stood still (closed empty after max_stale_s) or went back is no idle reading
            if quiet and interval.joules > 0 and t1 - t0 <= _QUIET_INTERVAL_MAX_S:
                self.idle.quiet(interval.joules, t1 - t0)
            else:
                self.idle.busy()
        self.totals.counter_joules += split.joules
        self.totals.idle_joules += split.idle_joules
        self.totals.base_joules += split.base_joules
        self.totals.unattributed_joules += split.unattributed_joules
        self.totals.attributed_joules += split.attributed_joules
        self._observe(split)

    def _add_marginal(
        self, t0: float, t1: float, inside: list[_Record], members: list[InFlight], other_sequences: float
    ) -> None:
        """Each request's time in flight in [t0, t1) (``members``: theirs in the interval, in order), by the
        power curve (``marginal_joules``)."""
        model = self._marginal
        if model is None or not inside:
            return
        added = marginal_joules(t0, t1, members, model.power_above_idle_w, other_sequences)
        for r, joules in zip(inside, added, strict=True):
            r.marginal_joules += joules

    def _observe(self, split: IntervalSplit) -> None:
        try:
            self._reports.interval(split)
        except Exception:  # a broken observer must not stop the accounting
            log.exception("energy: the interval observer failed")

    def _settled(self, record: _Record) -> SettledRequest:
        self.totals.settled_request_joules += record.joules
        return record.settled(self.source, self._resolution_s, self._marginal)

    def _report(self, settled: list[SettledRequest]) -> None:
        if not settled:
            return
        try:
            self._reports.settled(settled)
        except Exception:  # a broken observer must not stop (or repeat) the accounting
            log.exception(
                "energy: the observer of settled requests failed for %s (and %d more)",
                settled[0].request_id,
                len(settled) - 1,
            )


def _edge_joules(record: _Record, t0: float, t1: float, charge: float, resolution_s: float) -> float:
    """The part of ``charge`` (the request's in [t0, t1)) that the counter's timing cannot place on one
    side of the request's start or end falling in the interval: its above-idle power there × the
    resolution, for each edge in the interval, at most the charge."""
    assert record.end_s is not None
    edges = (t0 <= record.start_s < t1) + (t0 < record.end_s <= t1)
    if not edges:
        return 0.0
    ran_s = min(record.end_s, t1) - max(record.start_s, t0)
    power_w = charge / max(ran_s, resolution_s)
    return min(charge, edges * power_w * resolution_s)


def _ended(record: _Record) -> float:
    assert record.end_s is not None, "an interval is settled once the requests in it have ended"
    return record.end_s


def _overlaps(record: _Record, t0: float) -> bool:
    """Whether an ended record (that started before the interval's end) was in flight in it: it ended
    after the interval began, or it is an instant inside the interval."""
    assert record.end_s is not None
    return record.end_s > t0 or (record.end_s == record.start_s and record.start_s >= t0)

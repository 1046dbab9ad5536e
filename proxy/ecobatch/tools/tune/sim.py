"""A model of an engine under a release policy, faster than real time (a **model**, not a measurement).

Continuous engines (vLLM), as the ecobatch developers' release-policy model did and checked on an
H200: every sequence in flight decodes at the profile's per-sequence rate tok/s(C) / C, C being the
sequences in flight; the GPU draws the profile's power at C (its idle power at C = 0); a request's
energy share and prefill are not modelled, only the GPU's joules over the run and each request's
latency. The engine runs at most ``max_num_seqs`` sequences (default: the profile's largest measured
concurrency, beyond which the curve would be extrapolated); the rest wait in its own queue, as in vLLM.
Event-driven: between arrivals, releases, completions and the controller's wake-ups the concurrency is
constant, so the run costs O(events · log) whatever its length. Runs are compared over the same
wall-clock window (``same_window``): a policy that holds its last requests ends later, and meanwhile the
other run's GPU idles.

Static engines (HF, simulated): a batch of b sequences runs as many steps as its longest request, each
step b / tok/s(b), drawing the profile's power at b; one batch at a time.

Release policies: ``SendAtOnce`` (vLLM direct), ``FixedWindow(s)``, ``HoldWhileIdle(s)`` and
``GroupRelease(s)`` (the reference policies the developers emulated on an H200), and ``Controller``:
ecobatch's own run-time controller, the **same** ``release.plan_releases`` the gate calls, fed by the
same ``load.LoadTracker``, with the same settings. ``BatcherRule``: the static batcher's window
(``policy.window_closes_at_s``, the batcher's own rule) and batch size.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...config import BatchingSettings
from ...domain import TIERS, Tier
from ...profile import EnergyProfile
from ...serving.arrivals import ArrivalRate
from ...serving.load import LoadTracker
from ...serving.policy import window_closes_at_s
from ...serving.release import ReleaseSettings, ReplicaState, inflight_limit, plan_releases
from ..bench.workload import Arrival

__all__ = [
    "BatcherRule",
    "Controller",
    "FixedWindow",
    "GroupRelease",
    "HoldWhileIdle",
    "Result",
    "SendAtOnce",
    "same_window",
    "simulate_continuous",
    "simulate_static",
]


@dataclass(frozen=True, slots=True)
class SendAtOnce:
    cap: int = 10**9


@dataclass(frozen=True, slots=True)
class FixedWindow:
    """A window opens at the first waiting arrival and releases everything after ``window_s``."""

    window_s: float
    cap: int = 10**9


@dataclass(frozen=True, slots=True)
class HoldWhileIdle:
    """Release at once while anything is in flight; while idle, hold ``hold_s`` from the first arrival."""

    hold_s: float
    cap: int = 10**9


@dataclass(frozen=True, slots=True)
class GroupRelease:
    """Gather ``hold_s`` from the first waiting arrival, then release the group together, busy or not
    (never join a running batch): the flex emulation measured on the H200."""

    hold_s: float
    cap: int = 10**9


@dataclass(frozen=True, slots=True)
class Controller:
    """ecobatch's run-time controller with these batching settings (tiers from the arrivals)."""

    settings: BatchingSettings = field(default_factory=BatchingSettings)


@dataclass(frozen=True, slots=True)
class BatcherRule:
    """ecobatch's static batcher: the adaptive window, batches of up to ``batch_size``."""

    window_min_s: float
    window_max_s: float
    batch_size: int


Policy = SendAtOnce | FixedWindow | HoldWhileIdle | GroupRelease | Controller


@dataclass(frozen=True, slots=True)
class Result:
    requests: int
    joules: float
    seconds: float
    latencies_s: tuple[float, ...]
    generated_tokens: int
    #: seconds with something in flight, and ∫ sequences in flight dt (mean concurrency = this / seconds)
    busy_s: float = 0.0
    sequence_seconds: float = 0.0
    #: per request, in arrival order: its tier, its wait before release and before its first decode step
    #: (the wait in ecobatch plus the wait in the engine's own queue: its time to first token, prefill
    #: aside) (continuous engines)
    tiers: tuple[str, ...] = ()
    waits_s: tuple[float, ...] = ()
    starts_s: tuple[float, ...] = ()
    #: the GPU's idle power in the model (what it draws after the run, until another run's end)
    idle_power_w: float = 0.0

    @property
    def joules_per_request(self) -> float:
        return self.joules / max(self.requests, 1)

    def joules_until(self, seconds: float) -> float:
        """The GPU's joules from 0 to ``seconds`` (idle after the run's last answer): runs compared over
        the same wall-clock window, as a measurement must (a policy that holds its last requests ends
        later, and the other run's GPU idles meanwhile)."""
        return self.joules + self.idle_power_w * max(0.0, seconds - self.seconds)

    def latency_quantile_s(self, q: float) -> float:
        return _quantile(self.latencies_s, q)

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies_s) if self.latencies_s else 0.0

    @property
    def p99_s(self) -> float:
        return self.latency_quantile_s(0.99)

    def tier_latencies_s(self, tier: str) -> tuple[float, ...]:
        return tuple(x for x, t in zip(self.latencies_s, self.tiers, strict=True) if t == tier)

    def max_wait_s(self, tier: str) -> float:
        return max((w for w, t in zip(self.waits_s, self.tiers, strict=True) if t == tier), default=0.0)

    def first_token_waits_s(self, tier: str) -> tuple[float, ...]:
        """How long each request of ``tier`` waited for its first decode step (ecobatch and engine)."""
        return tuple(w for w, t in zip(self.starts_s, self.tiers, strict=True) if t == tier)


def _quantile(values: Sequence[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass(eq=False, slots=True)
class _Waiting:
    """A simulated request waiting for release (what ``release.Waiting`` asks of it)."""

    tier: Tier
    arrival_s: float
    output_tokens: float
    kv_tokens: float
    index: int
    actual_tokens: int
    sequences: int = 1


def _fixed_deadline(policy: Policy, waiting: deque[_Waiting], busy: bool, now: float) -> float | None:
    """The reference policies: when the waiting requests may go (now, a time, or None)."""
    if not waiting:
        return None
    first = waiting[0].arrival_s
    if isinstance(policy, SendAtOnce):
        return now
    if isinstance(policy, FixedWindow | GroupRelease):
        return first + policy.hold_s if isinstance(policy, GroupRelease) else first + policy.window_s
    assert isinstance(policy, HoldWhileIdle)
    return now if busy else first + policy.hold_s


def simulate_continuous(
    profile: EnergyProfile,
    arrivals: Sequence[Arrival],
    policy: Policy,
    *,
    max_num_seqs: int | None = None,
) -> Result:
    idle_w = profile.idle_power_w or 0.0
    engine_max = max_num_seqs or profile.max_size
    queues: dict[Tier, deque[_Waiting]] = {t: deque() for t in TIERS}
    fifo: deque[_Waiting] = deque()  # the reference policies see one line
    running: list[tuple[float, int, float]] = []  # heap of (tokens decoded when it ends, index, arrival)
    engine_queue: deque[_Waiting] = deque()  # released, waiting for one of the engine's slots
    max_end = 0.0  # tokens decoded when the last running request ends
    decoded = 0.0  # tokens every running sequence has decoded since t = 0 (they all decode alike)
    latencies: list[float] = [math.nan] * len(arrivals)
    waits: list[float] = [math.nan] * len(arrivals)
    starts: list[float] = [math.nan] * len(arrivals)
    joules = now = busy_s = sequence_seconds = 0.0
    i, n = 0, len(arrivals)
    controller = policy if isinstance(policy, Controller) else None
    load = LoadTracker(
        window_s=controller.settings.load_window_s if controller else 10.0,
        expected_completion_tokens=controller.settings.expected_completion_tokens if controller else 256,
        profile=profile,
    )
    cap = getattr(policy, "cap", 10**9)

    def rate(c: int) -> float:
        return profile.at(c).tokens_per_s / c if c else 0.0

    def run(w: _Waiting) -> None:
        nonlocal max_end
        starts[w.index] = now - w.arrival_s
        end = decoded + w.actual_tokens
        max_end = max(max_end, end) if running else end
        heapq.heappush(running, (end, w.index, w.arrival_s))

    def release(w: _Waiting) -> None:
        waits[w.index] = now - w.arrival_s
        if len(running) < engine_max:
            run(w)
        else:
            engine_queue.append(w)

    def plan(now: float) -> float | None:
        """Release what the policy releases now; return when to look again (None: at the next event)."""
        c = len(running) + len(engine_queue)  # ours in flight: running, or queued inside the engine
        if controller is None:
            deadline = _fixed_deadline(policy, fifo, c > 0, now)
            if deadline is not None and deadline <= now:
                while fifo and len(running) + len(engine_queue) < cap:
                    release(fifo.popleft())
                return None
            return deadline
        s = controller.settings
        estimate = load.estimate(now)
        limit = inflight_limit(
            profile,
            kv_capacity_tokens=None,
            kv_promised_tokens=0.0,
            other_sequences=0,
            tokens_per_sequence=load.kv_tokens_per_sequence,
            tpot_slo_s=None if s.tpot_slo_ms is None else s.tpot_slo_ms / 1000.0,
            max_inflight=s.max_inflight_sequences,
        )
        busy_until = now + (max_end - decoded) / rate(len(running)) if running else None
        state = ReplicaState(up=True, inflight=c, other_running=0, busy_until_s=busy_until, limit=limit)
        settings = ReleaseSettings.of(s, idle_power_w=idle_w)
        decided = plan_releases(now, queues, [state], estimate, profile, settings)
        for r in decided.releases:
            assert isinstance(r.request, _Waiting)
            queues[r.request.tier].remove(r.request)
            release(r.request)
        return decided.wake_at_s

    wake: float | None = None
    while i < n or any(queues.values()) or fifo or running or engine_queue:
        c = len(running)
        per_seq_tps = rate(c)
        candidates = []
        if i < n:
            candidates.append(arrivals[i].at_s)
        if running:
            candidates.append(now + (running[0][0] - decoded) / per_seq_tps)
        if wake is not None and wake > now:
            candidates.append(wake)
        if not candidates:  # held with nothing to wait for: a bug in a policy, not a hang
            raise RuntimeError(
                f"the policy holds {sum(map(len, queues.values())) + len(fifo)} requests forever"
            )
        t_next = min(candidates)
        dt = t_next - now
        joules += (profile.at(c).power_w if c else idle_w) * dt
        busy_s += dt if c else 0.0
        sequence_seconds += c * dt
        decoded += per_seq_tps * dt
        now = t_next
        while running and running[0][0] <= decoded + 1e-9:
            _, index, arrived = heapq.heappop(running)
            latencies[index] = now - arrived
            if engine_queue:  # a slot freed: the engine's own queue moves
                run(engine_queue.popleft())
            if controller is not None:
                tokens = arrivals[index].output_tokens
                load.finished(
                    max_tokens=tokens,
                    completion_tokens_per_sequence=tokens,
                    decode_s=latencies[index] - waits[index],
                    mean_concurrency=max(c, 1),
                )
        while i < n and arrivals[i].at_s <= now:
            a = arrivals[i]
            predicted = load.predict_output_tokens(a.output_tokens)
            w = _Waiting(a.tier, a.at_s, predicted, a.prompt_tokens + predicted, i, a.output_tokens)
            (queues[a.tier] if controller else fifo).append(w)
            load.arrived(a.at_s, a.tier, predicted, w.kv_tokens)
            i += 1
        wake = plan(now)
    tokens = sum(a.output_tokens for a in arrivals)
    return Result(
        len(arrivals),
        joules,
        now,
        tuple(latencies),
        tokens,
        busy_s,
        sequence_seconds,
        tuple(a.tier for a in arrivals),
        tuple(waits),
        tuple(starts),
        idle_w,
    )


def simulate_static(profile: EnergyProfile, arrivals: Sequence[Arrival], rule: BatcherRule) -> Result:
    idle_w = profile.idle_power_w or 0.0
    waiting: deque[Arrival] = deque()
    latencies: list[float] = []
    joules = now = busy_s = sequence_seconds = 0.0
    i, n = 0, len(arrivals)
    rate = ArrivalRate()  # the batcher's own estimate
    while i < n or waiting:
        while i < n and arrivals[i].at_s <= now:
            waiting.append(arrivals[i])
            rate.observe(arrivals[i].at_s)
            i += 1
        if not waiting:  # idle until the next arrival
            joules += idle_w * (arrivals[i].at_s - now)
            now = arrivals[i].at_s
            continue
        closes = window_closes_at_s(
            opened_s=waiting[0].at_s,
            now_s=now,
            collected=len(waiting),
            target=rule.batch_size,
            arrival_rate_per_s=rate.per_s(now),
            window_min_s=rule.window_min_s,
            window_max_s=rule.window_max_s,
        )
        if closes > now:
            t_next = min(closes, arrivals[i].at_s) if i < n else closes
            joules += idle_w * (t_next - now)
            now = t_next
            continue
        batch = [waiting.popleft() for _ in range(min(rule.batch_size, len(waiting)))]
        point = profile.at(len(batch))
        duration = max(a.output_tokens for a in batch) * point.step_s
        joules += point.power_w * duration
        busy_s += duration
        sequence_seconds += len(batch) * duration
        now += duration
        latencies += [now - a.at_s for a in batch]
    tokens = sum(a.output_tokens for a in arrivals)
    return Result(
        len(latencies), joules, now, tuple(latencies), tokens, busy_s, sequence_seconds, idle_power_w=idle_w
    )


def same_window(results: Sequence[Result]) -> list[float]:
    """Each run's joules per request over the same wall-clock window: until the latest run's end."""
    horizon = max((r.seconds for r in results), default=0.0)
    return [r.joules_until(horizon) / max(r.requests, 1) for r in results]

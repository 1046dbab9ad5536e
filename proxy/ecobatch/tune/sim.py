"""A model of an engine under a release policy, faster than real time (a **model**, not a measurement).

Continuous engines (vLLM), as the ecobatch developers' release-policy model did and checked on an
H200: every sequence in flight decodes at the profile's per-sequence rate tok/s(C) / C, C being the
sequences in flight; the GPU draws the profile's power at C (its idle power at C = 0); a request's
energy share and prefill are not modelled, only the GPU's joules over the run and each request's
latency. Event-driven: between arrivals, releases and completions the concurrency is constant, so the
run costs O(events · log) whatever its length.

Static engines (HF, simulated): a batch of b sequences runs as many steps as its longest request, each
step b / tok/s(b), drawing the profile's power at b; one batch at a time.

Release policies: ``SendAtOnce`` (vLLM direct), ``FixedWindow(s)``, ``HoldWhileIdle(s)`` (the reference
model's), and ``GateRule`` / ``BatcherRule``: ecobatch's own rules (``policy.window_length_s`` /
``should_close`` with the arrival-rate estimate, under an in-flight cap / a batch size).
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..arrivals import ArrivalRate
from ..bench.workload import Arrival
from ..policy import should_close, window_length_s
from ..profile import EnergyProfile

__all__ = [
    "BatcherRule",
    "FixedWindow",
    "GateRule",
    "HoldWhileIdle",
    "Result",
    "SendAtOnce",
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
class GateRule:
    """ecobatch's continuous gate: at once while busy; while idle, the adaptive window; under ``cap``."""

    window_min_s: float
    window_max_s: float
    cap: int


@dataclass(frozen=True, slots=True)
class BatcherRule:
    """ecobatch's static batcher: the adaptive window, batches of up to ``batch_size``."""

    window_min_s: float
    window_max_s: float
    batch_size: int


Policy = SendAtOnce | FixedWindow | HoldWhileIdle | GateRule


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

    @property
    def joules_per_request(self) -> float:
        return self.joules / max(self.requests, 1)

    def latency_quantile_s(self, q: float) -> float:
        if len(self.latencies_s) < 2:
            return self.latencies_s[0] if self.latencies_s else 0.0
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[round(q * 100) - 1]

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies_s) if self.latencies_s else 0.0

    @property
    def p99_s(self) -> float:
        return self.latency_quantile_s(0.99)


def _release_deadline(
    policy: Policy, waiting: deque[Arrival], busy: bool, rate: ArrivalRate, now: float
) -> float | None:
    """When the waiting requests may go: now, a time, or None (only when something changes)."""
    if not waiting:
        return None
    first = waiting[0].at_s
    if isinstance(policy, SendAtOnce):
        return now
    if isinstance(policy, FixedWindow):
        return first + policy.window_s
    if isinstance(policy, HoldWhileIdle):
        return now if busy else first + policy.hold_s
    if busy:
        return now
    deadline = first + window_length_s(
        arrival_rate_per_s=rate.per_s(now),
        target=policy.cap,
        window_min_s=policy.window_min_s,
        window_max_s=policy.window_max_s,
        slo_slack_s=float("inf"),
    )
    if should_close(
        now_s=now,
        deadline_s=deadline,
        collected=len(waiting),
        target=policy.cap,
        arrival_rate_per_s=rate.per_s(now),
    ):
        return now
    return deadline


def simulate_continuous(profile: EnergyProfile, arrivals: Sequence[Arrival], policy: Policy) -> Result:
    idle_w = profile.idle_power_w or 0.0
    waiting: deque[Arrival] = deque()
    running: list[tuple[float, int, float]] = []  # heap of (progress at which it ends, id, arrival time)
    progress = 0.0  # tokens every running sequence has decoded since t = 0 (they all decode alike)
    latencies: list[float] = []
    joules = now = busy_s = sequence_seconds = 0.0
    i, n, uid = 0, len(arrivals), 0
    rate = ArrivalRate()
    while i < n or waiting or running:
        c = len(running)
        per_seq_tps = profile.at(c).tokens_per_s / c if c else 0.0
        deadline = _release_deadline(policy, waiting, c > 0, rate, now)
        candidates = []
        if i < n:
            candidates.append(arrivals[i].at_s)
        if running:
            candidates.append(now + (running[0][0] - progress) / per_seq_tps)
        if deadline is not None and deadline > now:
            candidates.append(deadline)
        release_now = deadline is not None and deadline <= now and c < policy.cap
        t_next = now if release_now else min(candidates)
        dt = t_next - now
        joules += (profile.at(c).power_w if c else idle_w) * dt
        busy_s += dt if c else 0.0
        sequence_seconds += c * dt
        progress += per_seq_tps * dt
        now = t_next
        while running and running[0][0] <= progress + 1e-9:
            _, _, arrived = heapq.heappop(running)
            latencies.append(now - arrived)
        while i < n and arrivals[i].at_s <= now:
            waiting.append(arrivals[i])
            rate.observe(arrivals[i].at_s)
            i += 1
        deadline = _release_deadline(policy, waiting, bool(running), rate, now)
        if deadline is not None and deadline <= now:
            while waiting and len(running) < policy.cap:
                a = waiting.popleft()
                uid += 1
                heapq.heappush(running, (progress + a.output_tokens, uid, a.at_s))
    tokens = sum(a.output_tokens for a in arrivals)
    return Result(len(latencies), joules, now, tuple(latencies), tokens, busy_s, sequence_seconds)


def simulate_static(profile: EnergyProfile, arrivals: Sequence[Arrival], rule: BatcherRule) -> Result:
    idle_w = profile.idle_power_w or 0.0
    waiting: deque[Arrival] = deque()
    latencies: list[float] = []
    joules = now = busy_s = sequence_seconds = 0.0
    i, n = 0, len(arrivals)
    rate = ArrivalRate()
    while i < n or waiting:
        while i < n and arrivals[i].at_s <= now:
            waiting.append(arrivals[i])
            rate.observe(arrivals[i].at_s)
            i += 1
        if not waiting:  # idle until the next arrival
            joules += idle_w * (arrivals[i].at_s - now)
            now = arrivals[i].at_s
            continue
        first = waiting[0].at_s
        deadline = first + window_length_s(
            arrival_rate_per_s=rate.per_s(now),
            target=rule.batch_size,
            window_min_s=rule.window_min_s,
            window_max_s=rule.window_max_s,
            slo_slack_s=float("inf"),
        )
        if not should_close(
            now_s=now,
            deadline_s=deadline,
            collected=len(waiting),
            target=rule.batch_size,
            arrival_rate_per_s=rate.per_s(now),
        ):
            t_next = min(deadline, arrivals[i].at_s) if i < n else deadline
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
    return Result(len(latencies), joules, now, tuple(latencies), tokens, busy_s, sequence_seconds)

"""The run-time release controller for continuous engines: pure decisions, one call per dispatch round.

``plan_releases`` looks at what waits (per tier), at each replica (in flight, the engine's own running
count, when its running requests are predicted to end, its safety limit and KV room), at the live load
(arrival rate, the output-length mix) and at the energy profile, and says which waiting requests go now,
to which replica, and why; and when to look again. Nothing here reads a clock, awaits or mutates: the
gate (``gate``) and the engine model of ``tune`` (``tune.sim``) call the same function with their
own state.

The physics it respects (measured on an H200 with vLLM, Mistral-7B shape: the profiles in
``configs/profiles/``, the comparisons in ``benchmarks/results/``): on a continuous engine joules per
token fall monotonically with concurrency and power is concave in it, so the energy is in **busy
time**, not in steps.
An in-flight cap below what the load needs is never an energy lever. The lever is time:

* **priority** requests are never held: they go first, at once;
* **interactive** requests (``default`` / ``auto``) join at once while their replica is busy (joining
  running steps is nearly free). While it is idle they are held, within their budget, only as long as
  the model predicts a saving (``hold_saving_j``): arrivals expected during the hold would otherwise start
  late and stretch the busy time by their lag. Length-aware: a request is held at most its own predicted
  service time (a short request is not made to wait for long ones);
* **flex** requests gather (whatever the engine does) until the oldest one's budget runs out, then go
  together: the larger the group, the longer the engine runs full (its own queue refills the slots its
  short members free) and the longer it idles between groups. Enough have come earlier when, waiting
  longer, a later member could not start within its budget at the rate the engine starts sequences
  when full (``group_due_s``: only past saturation), or when the flex line fills half the queue. A flex
  request whose predicted service ends before the busy replica's running requests do joins at once: it
  adds no busy time. Trickling deferrable work into a running batch keeps the GPU busy at low
  concurrency; gathering it is where the large savings are;
* the **safety limit** (``inflight_limit``) bounds what is in flight by KV room (each request's
  predicted KV tokens must fit what the cache has not promised yet), an inter-token latency objective
  and an optional hard limit, never by the energy curve. Under it, requests are checked one by one (a
  short request that fits is not held behind a long one that does not), earliest budget first; a
  request overdue by more than its own service time reserves the next room (it cannot starve).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from ..domain import Tier
from ..profile import EnergyProfile
from .routing import ReplicaLoad, RoutingPolicy, choose_replica

if TYPE_CHECKING:
    from ..config import BatchingSettings

__all__ = [
    "RELEASE_MARGIN_S",
    "UNLIMITED",
    "Hold",
    "Limit",
    "LimitReason",
    "LoadEstimate",
    "Plan",
    "Reason",
    "Release",
    "ReleaseSettings",
    "ReplicaState",
    "Waiting",
    "group_due_s",
    "hold_saving_j",
    "inflight_limit",
    "plan_releases",
    "replicas_needed",
]

#: the safety limit when nothing limits (sequences)
UNLIMITED = 1_000_000

Reason = Literal[
    "priority",  # released: the priority tier is never held
    "busy",  # released: its replica is busy; joining running steps is nearly free
    "no_saving",  # released: its replica is idle and holding would save too little
    "budget",  # released: its budget (or its length-aware hold) ran out
    "group_full",  # released: waiting longer, a later member of the flex group would start past its budget
    "queue_full",  # released: the flex line fills half the queue (interactive requests keep room)
    "fits_busy",  # released: a flex request that ends before the running requests do
    "hold_saving",  # held: the replica is idle and holding is predicted to save energy
    "gathering",  # held: a flex group gathering
    "limit",  # held: no room under the safety limit
]
HELD_REASONS: frozenset[str] = frozenset({"hold_saving", "gathering", "limit"})
LimitReason = Literal["kv", "tpot", "max_inflight", "none"]
#: flex requests examined per round for "fits_busy" (the rest wait for their group anyway)
_FIT_SCAN = 64
#: a held request goes this much before its budget ends: a timer fires late by the event loop's lag
#: (ecobatch_event_loop_lag_seconds: p99 under 25 ms in the soak test; ~1 ms when idle)
RELEASE_MARGIN_S = 0.01
#: arrivals per second the energy model believes at most (a burst at one instant reads as infinite)
_MAX_RATE_PER_S = 1e4


class Waiting(Protocol):
    """A request waiting in ecobatch, as the controller sees it."""

    @property
    def tier(self) -> Tier: ...

    @property
    def arrival_s(self) -> float: ...

    @property
    def sequences(self) -> int: ...

    @property
    def output_tokens(self) -> float:
        """Predicted generated tokens, all its sequences together."""
        ...

    @property
    def kv_tokens(self) -> float:
        """Predicted KV tokens at its end: prompt + generated, all its sequences together."""
        ...


@dataclass(frozen=True, slots=True)
class Limit:
    """The safety limit of one replica: at most ``sequences`` in flight (ours), and a request goes only if
    its predicted KV tokens fit the ``kv_room_tokens`` not yet promised (None: unknown, limits nothing)."""

    sequences: int
    limited_by: LimitReason
    kv_room_tokens: float | None = None

    def binding(self, tokens_per_sequence: float) -> LimitReason:
        """What limits the next typical request: the KV room where it cannot hold one more."""
        if self.kv_room_tokens is not None and self.kv_room_tokens < tokens_per_sequence:
            return "kv"
        return self.limited_by


@dataclass(frozen=True, slots=True)
class ReplicaState:
    up: bool
    #: ecobatch's sequences in flight on it
    inflight: int
    #: requests other clients run on the same engine (its running count beyond ecobatch's; 0: unknown)
    other_running: int
    #: when ecobatch's requests running there are predicted to end (None: nothing of ours runs)
    busy_until_s: float | None
    limit: Limit

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.other_running > 0


@dataclass(frozen=True, slots=True)
class LoadEstimate:
    """Live estimates over a sliding window (``load.LoadTracker``)."""

    #: arrivals per second that would join an interactive hold (priority and interactive)
    arrival_rate_per_s: float
    #: recent requests' predicted generated tokens (the length mix), per sequence
    output_tokens_sample: tuple[float, ...]
    #: measured per-sequence decode speed / the profile's at the same concurrency (1: as the profile)
    speed_factor: float = 1.0
    #: the engine's time from release to first token, as measured on streams (seconds)
    ttft_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ReleaseSettings:
    interactive_budget_s: float
    flex_budget_s: float
    min_saving_fraction: float
    #: the flex line goes once it holds this many requests (half the queue: interactive keeps room)
    flex_queue_limit: int
    routing: RoutingPolicy = "pack"
    idle_power_w: float = 0.0

    @classmethod
    def of(
        cls, batching: BatchingSettings, *, routing: RoutingPolicy = "pack", idle_power_w: float = 0.0
    ) -> ReleaseSettings:
        """The controller's settings from the batching section."""
        return cls(
            interactive_budget_s=batching.interactive_budget_s,
            flex_budget_s=batching.flex_budget_s,
            min_saving_fraction=batching.min_saving_fraction,
            flex_queue_limit=max(1, batching.max_queue // 2),
            routing=routing,
            idle_power_w=idle_power_w,
        )


@dataclass(frozen=True, slots=True)
class Release:
    request: Waiting
    replica: int
    reason: Reason


@dataclass(frozen=True, slots=True)
class Hold:
    """Requests of one tier held this round: how many, until when (None: until room frees), why, and the
    saving the model predicts for an idle hold (joules)."""

    tier: Tier
    count: int
    until_s: float | None
    reason: Reason
    predicted_saving_j: float = 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    releases: tuple[Release, ...]
    holds: tuple[Hold, ...]
    #: when to decide again if nothing happens before (None: at the next arrival or completion)
    wake_at_s: float | None


# ---- the safety limit --------------------------------------------------------------------------------
def inflight_limit(
    profile: EnergyProfile,
    *,
    kv_capacity_tokens: int | None,
    kv_promised_tokens: float,
    other_sequences: int,
    tokens_per_sequence: float,
    tpot_slo_s: float | None,
    max_inflight: int | None,
    speed_factor: float = 1.0,
) -> Limit:
    """The safety limit of one replica: what keeps one decode step under ``tpot_slo_s`` on the profile
    (corrected by the measured ``speed_factor``), ``max_inflight``, and the KV room its cache has left at
    the predicted final length of what runs (``kv_promised_tokens``: ecobatch's requests in flight;
    other clients' running sequences at the mean length). Never an energy choice: the curve falls all
    the way to saturation."""
    candidates: list[tuple[int, LimitReason]] = []
    room: float | None = None
    if kv_capacity_tokens is not None:
        room = kv_capacity_tokens - kv_promised_tokens - other_sequences * max(tokens_per_sequence, 1.0)
    if tpot_slo_s is not None:
        step = profile.at(1).step_s / max(speed_factor, 1e-9)
        size = 1 if step > tpot_slo_s else _largest_size_within(profile, tpot_slo_s * max(speed_factor, 1e-9))
        candidates.append((size, "tpot"))
    if max_inflight is not None:
        candidates.append((max_inflight, "max_inflight"))
    if not candidates:
        return Limit(UNLIMITED, "none", room)
    sequences, reason = min(candidates, key=lambda c: c[0])
    return Limit(max(1, sequences), reason, room)


def _largest_size_within(profile: EnergyProfile, step_s: float) -> int:
    """The largest concurrency whose decode step (profile) takes at most ``step_s``; past the profile's
    largest point the step time is extrapolated flat per sequence."""
    lo, hi = 1, 1
    while profile.at(hi).step_s <= step_s and hi < UNLIMITED:
        lo, hi = hi, hi * 2
    if hi >= UNLIMITED:
        return UNLIMITED
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if profile.at(mid).step_s <= step_s else (lo, mid)
    return lo


# ---- the energy model ----------------------------------------------------------------------------
def _rate_tok_s(profile: EnergyProfile, concurrency: float, speed_factor: float) -> float:
    """Per-sequence decode speed at ``concurrency``, tokens per second."""
    c = max(concurrency, 1.0)
    return profile.at(c).tokens_per_s / c * speed_factor


def replicas_needed(
    profile: EnergyProfile,
    *,
    arrival_rate_per_s: float,
    output_tokens_per_request: float,
    limit_sequences: int,
    speed_factor: float = 1.0,
) -> float:
    """How many replicas' worth of work the load is, packed: the sequences it keeps in flight when each
    replica runs full (Little's law: arrivals a second × a request's time in the engine at full
    concurrency) over what one replica holds when full (its safety limit, at most the profile's largest
    measured concurrency). Fractional, so that per-pod values add up; an autoscaler rounds up.

    J/token falls with concurrency all the way to saturation, so the fewest replicas that carry the load
    at their limit spend the fewest joules: the energy-aware scale signal."""
    full = max(1, min(limit_sequences, profile.max_size))
    seconds_in_engine = output_tokens_per_request / _rate_tok_s(profile, full, speed_factor)
    return max(0.0, arrival_rate_per_s) * seconds_in_engine / full


def hold_saving_j(
    profile: EnergyProfile,
    *,
    group_output_tokens: Sequence[float],
    hold_s: float,
    arrival_rate_per_s: float,
    output_tokens_sample: Sequence[float],
    idle_power_w: float,
    speed_factor: float = 1.0,
) -> tuple[float, float]:
    """(predicted joules saved by holding an idle replica's group ``hold_s`` longer, the group's predicted
    energy above idle if released now).

    Released now, the group's busy time is its longest member's service time T_G; an arrival at offset
    a ∈ [0, hold) with service time T joins at once and ends at a + T. Held, everyone starts together.
    So each expected arrival saves E_a[max(T_G, a + T) - max(T_G, T)] = (h - clamp(T_G - T, 0, h))² / 2h
    seconds of busy time, at the power above idle of the group's concurrency. The hold itself costs
    nothing on this model (the GPU idles either way); its price is latency, bounded by the budgets."""
    k = max(len(group_output_tokens), 1)
    rate = _rate_tok_s(profile, k, speed_factor)
    t_group = max(group_output_tokens, default=0.0) / rate
    above_idle_w = max(0.0, profile.at(k).power_w - idle_power_w)
    group_j = above_idle_w * t_group
    if hold_s <= 0 or arrival_rate_per_s <= 0 or not output_tokens_sample:
        return 0.0, group_j
    expected = 0.0
    for tokens in output_tokens_sample:
        x = min(max(t_group - tokens / rate, 0.0), hold_s)
        expected += (hold_s - x) ** 2 / (2.0 * hold_s)
    per_arrival_s = expected / len(output_tokens_sample)
    joiners = min(arrival_rate_per_s, _MAX_RATE_PER_S) * hold_s
    power_w = max(0.0, profile.at(k + joiners).power_w - idle_power_w)
    return joiners * per_arrival_s * power_w, group_j


# ---- one round --------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Room:
    """What each replica can still take this round (changes as the round assigns requests)."""

    inflight: list[int]
    kv_room: list[float | None]
    limits: list[int]
    up: list[bool]
    last: int

    def choose(self, request: Waiting, routing: RoutingPolicy) -> int | None:
        """The replica ``routing`` picks among those with room for it (sequences under the limit, and
        KV room for its predicted final length; an idle replica takes anything)."""
        loads = []
        for inflight, cap, up, kv in zip(self.inflight, self.limits, self.up, self.kv_room, strict=True):
            if kv is not None and request.kv_tokens > kv and inflight > 0:
                cap = 0  # its KV cache cannot hold this request now
            loads.append(ReplicaLoad(inflight, cap, up))
        return choose_replica(loads, request.sequences, routing, after=self.last)

    def take(self, index: int, request: Waiting) -> None:
        self.inflight[index] += request.sequences
        room = self.kv_room[index]
        if room is not None:
            self.kv_room[index] = room - request.kv_tokens
        self.last = index


@dataclass(slots=True)
class _Round:
    """One call of ``plan_releases``: what each tier's rule reads, and what it adds to the plan."""

    now_s: float
    replicas: Sequence[ReplicaState]
    load: LoadEstimate
    profile: EnergyProfile
    settings: ReleaseSettings
    room: _Room
    release: _ReleaseFn
    holds: list[Hold]
    wakes: list[float]


def plan_releases(
    now_s: float,
    waiting: Mapping[Tier, Sequence[Waiting]],
    replicas: Sequence[ReplicaState],
    load: LoadEstimate,
    profile: EnergyProfile,
    settings: ReleaseSettings,
    *,
    last_replica: int = -1,
) -> Plan:
    """Which waiting requests go now (each queue in arrival order), and when to decide again."""
    room = _Room(
        [r.inflight for r in replicas],
        [r.limit.kv_room_tokens for r in replicas],
        [r.limit.sequences for r in replicas],
        [r.up for r in replicas],
        last_replica,
    )
    releases: list[Release] = []
    holds: list[Hold] = []
    wakes: list[float] = []
    blocked = False  # a request whose budget ran out found no room: the next room is its

    def release(request: Waiting, reason: Reason) -> bool:
        index = room.choose(request, settings.routing)
        if index is None:
            return False
        room.take(index, request)
        releases.append(Release(request, index, reason))
        return True

    # 1. priority: never held, first in line; one that finds no room reserves the next room
    queue = waiting.get("priority", ())
    held = 0
    for request in queue:
        if blocked or not release(request, "priority"):
            blocked = True
            held += 1
    if held:
        holds.append(Hold("priority", held, None, "limit"))
    # 2. interactive, then 3. flex
    this_round = _Round(now_s, replicas, load, profile, settings, room, release, holds, wakes)
    interactive = waiting.get("interactive", ())
    saving_hold: Hold | None = None  # interactive held on an idle replica for a predicted saving
    if interactive and blocked:
        holds.append(Hold("interactive", len(interactive), None, "limit"))
    elif interactive:
        blocked = _interactive(this_round, interactive)
        if holds and holds[-1].tier == "interactive" and holds[-1].reason == "hold_saving":
            saving_hold = holds[-1]
    queue = waiting.get("flex", ())
    if queue and blocked:
        holds.append(Hold("flex", len(queue), None, "limit"))
    elif queue:
        flex_from = len(releases)
        _flex(this_round, queue)
        if saving_hold is not None and len(releases) > flex_from:
            # a flex group goes this round: the replica the hold waited on may be busy now, and an
            # interactive request joins a busy replica at once (decided again on the room left)
            holds.remove(saving_hold)
            if saving_hold.until_s is not None:
                wakes.remove(saving_hold.until_s)
            _interactive(this_round, interactive)
    return Plan(tuple(releases), tuple(holds), min(wakes) if wakes else None)


def release_by_s(request: Waiting, settings: ReleaseSettings, load: LoadEstimate) -> float:
    """The latest release that keeps the request's budget to its first token: the engine's measured time
    to first token and ``RELEASE_MARGIN_S`` (a timer's own lateness) taken off."""
    budget = settings.flex_budget_s if request.tier == "flex" else settings.interactive_budget_s
    if request.tier == "priority":
        budget = 0.0
    return request.arrival_s + max(0.0, budget - load.ttft_s - RELEASE_MARGIN_S)


def _service_s(profile: EnergyProfile, tokens: float, concurrency: float, load: LoadEstimate) -> float:
    return tokens / _rate_tok_s(profile, concurrency, load.speed_factor)


def _interactive(r: _Round, queue: Sequence[Waiting]) -> bool:
    """Release or hold the interactive queue; True when a request past its budget found no room."""
    now_s, replicas, load, profile, settings = r.now_s, r.replicas, r.load, r.profile, r.settings
    room, release, holds, wakes = r.room, r.release, r.holds, r.wakes
    # Where would the head go, and is that replica busy? (pack routing: the fullest replica with room)
    head_index = room.choose(queue[0], settings.routing)
    idle_target = head_index is not None and not replicas[head_index].busy and room.inflight[head_index] == 0
    hold_until: float | None = None
    saving_j = 0.0
    reason: Reason = "busy"
    if idle_target:
        # each request is held at most its budget and its own predicted service time (length-aware)
        deadline = min(
            min(
                release_by_s(r, settings, load),
                r.arrival_s + _service_s(profile, r.output_tokens / r.sequences, len(queue), load),
            )
            for r in queue
        )
        reason = "budget" if deadline <= now_s else "no_saving"
        if deadline > now_s:
            saving_j, group_j = hold_saving_j(
                profile,
                group_output_tokens=[r.output_tokens / r.sequences for r in queue],
                hold_s=deadline - now_s,
                arrival_rate_per_s=load.arrival_rate_per_s,
                output_tokens_sample=load.output_tokens_sample,
                idle_power_w=settings.idle_power_w,
                speed_factor=load.speed_factor,
            )
            if saving_j > 0 and saving_j >= settings.min_saving_fraction * group_j:
                hold_until = deadline
    if hold_until is not None:
        holds.append(Hold("interactive", len(queue), hold_until, "hold_saving", saving_j))
        wakes.append(hold_until)
        return False
    # release, earliest budget first (arrival order): each request that fits goes; one that does not
    # fit is passed by those behind it until it is overdue by its own service time, then it goes next
    left = 0
    blocked = False
    for request in queue:
        if blocked:
            left += 1
            continue
        if not release(request, reason):
            left += 1
            service = _service_s(profile, request.output_tokens / request.sequences, 1, load)
            blocked = release_by_s(request, settings, load) + service <= now_s
    if left:
        holds.append(Hold("interactive", left, None, "limit"))
    return blocked


def group_due_s(
    queue: Sequence[Waiting],
    settings: ReleaseSettings,
    load: LoadEstimate,
    *,
    free_slots: int,
    starts_per_s: float,
) -> tuple[float, bool]:
    """When the flex group must go: the earliest moment at which, released together, one of its members
    would start later than its budget allows. The engine starts ``free_slots`` sequences at once and
    then ``starts_per_s`` a second as its slots free, in order. Below saturation that is the oldest
    one's budget; above it, later members bind. Returns (that time, whether the oldest one's budget
    sets it)."""
    oldest = release_by_s(queue[0], settings, load)
    due, ahead = oldest, 0
    for request in queue:
        waits_s = max(0, ahead - free_slots) / starts_per_s
        due = min(due, release_by_s(request, settings, load) - waits_s)
        ahead += request.sequences
    return due, due >= oldest


def _engine_starts(
    profile: EnergyProfile, queue: Sequence[Waiting], load: LoadEstimate, room: _Room
) -> tuple[int, float]:
    """(free slots, sequences started a second when full) of the replicas that are up: a replica holds
    as many as its limit and its KV room allow (of the group's mean size), at most its largest measured
    concurrency; each slot frees after the group's mean predicted length at that concurrency's speed."""
    up = [i for i, u in enumerate(room.up) if u] or list(range(len(room.up)))
    sequences = max(sum(r.sequences for r in queue), 1)
    tokens = sum(r.output_tokens for r in queue) / sequences
    kv_per_sequence = sum(r.kv_tokens for r in queue) / sequences
    free, starts_per_s = 0, 0.0
    for i in up:
        full = min(room.limits[i], profile.max_size)  # what this replica runs when full
        kv_room = room.kv_room[i]
        if kv_room is not None and kv_per_sequence > 0:
            full = min(full, room.inflight[i] + int(max(0.0, kv_room) // kv_per_sequence))
        full = max(1, full)
        free += max(0, full - room.inflight[i])
        starts_per_s += full * _rate_tok_s(profile, full, load.speed_factor) / max(tokens, 1.0)
    return free, starts_per_s


def _flex(r: _Round, queue: Sequence[Waiting]) -> None:
    """Gather the flex line; release it together when it is due (or when it fills half the queue); let
    a request that adds no busy time join a running batch."""
    now_s, replicas, load, profile, settings = r.now_s, r.replicas, r.load, r.profile, r.settings
    room, release, holds, wakes = r.room, r.release, r.holds, r.wakes
    free, starts_per_s = _engine_starts(profile, queue, load, room)
    due_s, oldest_sets_it = group_due_s(queue, settings, load, free_slots=free, starts_per_s=starts_per_s)
    reason: Reason | None = None
    if due_s <= now_s:
        reason = "budget" if oldest_sets_it else "group_full"
    elif len(queue) >= settings.flex_queue_limit:
        reason = "queue_full"
    if reason is not None:
        left = sum(1 for r in queue if not release(r, reason))
        if left:
            holds.append(Hold("flex", left, None, "limit"))
        return
    # free riders: a flex request that ends before the busy replica's running requests do
    joined = 0
    for request in list(itertools.islice(queue, _FIT_SCAN)):
        index = room.choose(request, settings.routing)
        if index is None:
            continue
        state = replicas[index]
        if not state.busy or state.busy_until_s is None:
            continue
        concurrency = room.inflight[index] + request.sequences
        ends_s = now_s + _service_s(profile, request.output_tokens / request.sequences, concurrency, load)
        if ends_s <= state.busy_until_s and release(request, "fits_busy"):
            joined += 1
    if len(queue) - joined:
        holds.append(Hold("flex", len(queue) - joined, due_s, "gathering"))
        wakes.append(due_s)


class _ReleaseFn(Protocol):
    def __call__(self, request: Waiting, reason: Reason) -> bool: ...

"""The attribution rule for one interval of the energy counter, as a pure function.

**What a receipt means.** A request is charged the energy the GPU drew **above its idle power** while
the request was in flight, shared with the requests in flight beside it by the work each did there. The
GPU's idle power (what it draws switched on and doing nothing) is a cost of having the GPU, not of any
request: the **idle** bucket holds idle power × the whole interval, whether or not anything ran. Beside
its charge each request is told its **base** share: the idle power while it was in flight, split among
the requests in flight by in-flight time × sequences (a full-cost view: charge + base), reported, never
added to the charge.

Given the interval [t0, t1), the joules the counter moved in it (``None`` for a modelled meter) and
what each of ecobatch's requests did in it (``InFlight``), ``split_interval`` returns:

1. **idle** = idle power × (t1 − t0), at most the interval's joules; the rest is **above idle**;
2. with none of ecobatch's requests in flight, the above-idle joules belong to requests that **ended
   just before** (``tail``: the power's decay and the counter's lag not undone after a request's last
   token; weighted by what each was charged so far), unless another client's work was in flight
   (``other_sequences`` > 0), else to **other work** (another client of the same GPU);
3. with some in flight, ecobatch's part is the above-idle joules × their share of the sequences in
   flight (``other_sequences``: another client's, from the engine's own count), at most busy time ×
   (``max_power_w`` − idle power), plus ``cap_slack_s`` × ``max_power_w`` (a counter that moves in
   steps can report a step's energy more than the interval lasted); the rest is other work;
4. ecobatch's part is split by the **work each request did in the interval**: a generated token weighs
   1, a prompt token ``prefill_weight`` (the measured ratio of a prompt token's energy above idle to a
   generated token's, at the interval's concurrency); with no token in the interval, by in-flight
   time × sequences, else equally.

Modelled (``joules=None``): the interval's joules are idle power × idle time + ``active_model``
(generated tokens, mean concurrency): the profile's energy for that work, idle power included.

So idle + other work + Σ charges = the counter's delta, exactly; Σ base ≤ idle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

__all__ = ["ActiveModel", "InFlight", "IntervalSplit", "Shares", "split_interval", "union_length"]

#: (generated tokens in the interval, mean sequences in flight while busy) -> joules while busy
ActiveModel = Callable[[float, float], float]


class InFlight(msgspec.Struct, frozen=True):
    """One request's part in an interval: its in-flight time there, its sequences, its tokens there."""

    start_s: float
    end_s: float
    sequences: int
    prompt_tokens: float
    generated_tokens: float


@dataclass(frozen=True, slots=True)
class IntervalSplit:
    t0_s: float
    t1_s: float
    joules: float
    #: idle power × the interval (at most ``joules``): the cost of having the GPU on
    idle_joules: float
    #: above idle and not ecobatch's: another client's work
    unattributed_joules: float
    #: above idle and ecobatch's: the requests' charges (tail included)
    attributed_joules: float
    busy_s: float
    #: the counter could not be read in this interval: nothing was measured
    gap: bool = False
    #: the part of ``idle_joules`` while ecobatch's requests were in flight (their base shares)
    base_joules: float = 0.0
    #: the idle power the interval was split at
    idle_power_w: float = 0.0


@dataclass(frozen=True, slots=True)
class Shares:
    """Each member's charge and base share (in ``members``' order) and each tail request's charge."""

    charges: list[float]
    bases: list[float]
    tail: list[float]


def split_interval(
    t0_s: float,
    t1_s: float,
    joules: float | None,
    members: Sequence[InFlight],
    *,
    idle_power_w: float,
    prefill_weight: float,
    max_power_w: float | None = None,
    active_model: ActiveModel | None = None,
    other_sequences: float = 0.0,
    tail: Sequence[float] = (),
    cap_slack_s: float = 0.0,
) -> tuple[IntervalSplit, Shares]:
    """The interval's split and the shares; idle + unattributed + Σ charges + Σ tail = joules."""
    seconds = max(0.0, t1_s - t0_s)
    busy = union_length([(m.start_s, m.end_s) for m in members])
    if joules is None:
        occupancy = sum((m.end_s - m.start_s) * m.sequences for m in members)
        concurrency = occupancy / busy if busy > 0 else float(sum(m.sequences for m in members) or 1)
        generated = sum(m.generated_tokens for m in members)
        active_j = active_model(generated, concurrency) if active_model is not None and members else 0.0
        joules = idle_power_w * max(0.0, seconds - busy) + active_j
    idle_j = min(joules, idle_power_w * seconds)
    above = joules - idle_j
    base_j = idle_j * busy / seconds if seconds > 0 else 0.0
    charges, bases, tail_j = [0.0] * len(members), [0.0] * len(members), [0.0] * len(tail)
    ours = 0.0
    if members:
        ours_seq_s = sum((m.end_s - m.start_s) * m.sequences for m in members)
        others_seq_s = max(0.0, other_sequences) * seconds
        ours = (
            above * ours_seq_s / (ours_seq_s + others_seq_s) if ours_seq_s > 0 and others_seq_s > 0 else above
        )
        if max_power_w is not None:  # a counter that moves in steps can hold a step more than the interval
            slack_j = max_power_w * min(seconds, cap_slack_s)
            ours = min(ours, max(0.0, max_power_w - idle_power_w) * busy + slack_j)
        weights = [m.generated_tokens + prefill_weight * m.prompt_tokens for m in members]
        charges = _spread(ours, weights, members)
        bases = _spread(base_j, [(m.end_s - m.start_s) * m.sequences for m in members], members)
    elif tail and other_sequences <= 0 and above > 0:
        ours = above
        tail_j = _spread(ours, list(tail), [])
    ours = min(ours, above)  # a rounding error never makes other work negative
    split = IntervalSplit(
        t0_s,
        t1_s,
        joules,
        idle_j,
        max(0.0, above - ours),
        ours,
        busy,
        base_joules=base_j if members else 0.0,
        idle_power_w=idle_power_w,
    )
    return split, Shares(charges, bases, tail_j)


def _spread(total: float, weights: list[float], members: Sequence[InFlight]) -> list[float]:
    """``total`` split by ``weights``; by in-flight time × sequences where they are all zero, else
    equally."""
    if not weights:
        return []
    if sum(weights) <= 0 and members:
        weights = [(m.end_s - m.start_s) * m.sequences for m in members]
    if sum(weights) <= 0:
        weights = [1.0] * len(weights)
    scale = total / sum(weights)
    return [w * scale for w in weights]


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total

"""The attribution rule for one interval of the energy counter, as a pure function.

Given the interval [t0, t1), the joules the counter moved in it (or ``None`` for a modelled meter),
and what each of ecobatch's requests did in it (``InFlight``), ``split_interval`` returns the split:
idle, unattributed (another client's work), and each request's share. The ledger (``ledger.py``)
keeps the state and decides when an interval can be split; the rule itself lives here, tested on
plain numbers.

1. busy time = the union of the requests' in-flight time within the interval; idle time = the rest,
   charged at ``idle_power_w`` (never more than the interval holds);
2. with no request in flight, the joules beyond that are another client's (unattributed); with some,
   they take at most busy time × ``max_power_w`` and the excess is unattributed too;
3. the requests' part is split by the tokens each processed in the interval (a prompt token weighs
   ``prefill_weight`` generated tokens), else by in-flight time × sequences, else equally.
Modelled: the joules are idle power × idle time + ``active_model(generated tokens, mean concurrency)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["ActiveModel", "InFlight", "IntervalSplit", "split_interval"]

#: (generated tokens in the interval, mean sequences in flight while busy) -> active joules
ActiveModel = Callable[[float, float], float]


@dataclass(frozen=True, slots=True)
class InFlight:
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
    idle_joules: float
    unattributed_joules: float
    attributed_joules: float
    busy_s: float
    #: the counter could not be read in this interval: nothing was measured
    gap: bool = False


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
) -> tuple[IntervalSplit, list[float]]:
    """The interval's split and each member's joules (in ``members``' order); they add up exactly."""
    busy = _union_length([(m.start_s, m.end_s) for m in members])
    idle_s = max(0.0, (t1_s - t0_s) - busy)
    if joules is None:
        occupancy = sum((m.end_s - m.start_s) * m.sequences for m in members)
        concurrency = occupancy / busy if busy > 0 else float(sum(m.sequences for m in members) or 1)
        generated = sum(m.generated_tokens for m in members)
        active_j = active_model(generated, concurrency) if active_model is not None and members else 0.0
        joules = idle_power_w * idle_s + active_j
    idle_j = min(joules, idle_power_w * idle_s)
    ours = joules - idle_j if members else 0.0
    if members and max_power_w is not None and busy > 0:
        ours = min(ours, max_power_w * busy)
    shares = [0.0] * len(members)
    if ours > 0:
        weights = [m.generated_tokens + prefill_weight * m.prompt_tokens for m in members]
        if sum(weights) <= 0:
            weights = [(m.end_s - m.start_s) * m.sequences for m in members]
        if sum(weights) <= 0:
            weights = [1.0] * len(members)
        total_w = sum(weights)
        shares = [ours * w / total_w for w in weights]
    split = IntervalSplit(t0_s, t1_s, joules, idle_j, joules - idle_j - ours, ours, busy)
    return split, shares


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total

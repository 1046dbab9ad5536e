"""Pure decisions for static engines: how big a batch, how long a window (continuous engines: ``release``).

Nothing here does I/O or reads a clock: every input is an argument, so each rule is tested with plain
numbers.

Batch size (``choose_batch_size``): the batch for a static engine (HF generate, simulated): the GPU
batch is what the proxy sends, so the batch size sets the joules per token directly.
    1. The candidates are 1 … min(max_batch_sequences, the profile's largest measured size).
    2. KV headroom: a sequence may grow to prompt + completion tokens; the engine's free KV tokens must
       hold the new ones (in-flight sequences already own theirs).
    3. Latency SLO: window + completion tokens × step time at that batch size must fit the SLO.
    4. Energy: among the feasible sizes, the smallest one whose J/token is within ``energy_tolerance``
       of the feasible minimum. Past the knee of the curve a larger batch buys almost nothing and costs
       latency and KV room.

Window (``window_closes_at_s``, from ``window_length_s`` and ``should_close``)
    Every batch waits for its window; the batcher and ``tune``'s engine model call the same rule.
    The window opens at the first arrival. Its length is window_min + (window_max - window_min) · u,
    with u = min(1, λ · window_max / target): at low arrival rates a longer wait gains nothing, and
    under load it lengthens toward window_max. It never runs past the latency SLO's slack. It closes
    at the first of: the batch reached its target; the deadline passed; fewer than one more arrival is
    expected before the deadline (λ · time left < 1), so waiting could not grow the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..domain import Demand, Headroom
from ..profile import EnergyProfile

__all__ = ["Decision", "choose_batch_size", "should_close", "window_closes_at_s", "window_length_s"]

Limit = Literal["energy", "kv", "slo", "max_batch_sequences"]


@dataclass(frozen=True, slots=True)
class Decision:
    batch_size: int
    limited_by: Limit
    joules_per_token: float
    expected_latency_s: float
    kv_limit: int | None


def _expected_latency_s(profile: EnergyProfile, batch_size: int, demand: Demand, window_s: float) -> float:
    return window_s + demand.completion_tokens * profile.at(batch_size).step_s


def choose_batch_size(
    profile: EnergyProfile,
    headroom: Headroom,
    demand: Demand,
    *,
    slo_s: float,
    max_batch_sequences: int,
    energy_tolerance: float,
    inflight: int = 0,
    window_s: float = 0.0,
) -> Decision:
    """The batch size that spends the fewest joules per token within the KV headroom and the latency
    SLO. ``inflight`` sequences already hold their KV blocks."""
    upper = max(1, min(max_batch_sequences, profile.max_size))
    limit: Limit = "max_batch_sequences"
    kv_limit: int | None = None
    if headroom.kv_free_tokens is not None:
        kv_limit = inflight + math.floor(headroom.kv_free_tokens / max(demand.tokens_per_sequence, 1.0))
        if kv_limit < upper:
            upper, limit = max(1, kv_limit), "kv"
    slo_fit = upper
    while slo_fit > 1 and _expected_latency_s(profile, slo_fit, demand, window_s) > slo_s:
        slo_fit -= 1
    if slo_fit < upper:
        upper, limit = slo_fit, "slo"
    curve, running_min = profile.joules_per_token_curve()  # index i is batch size i + 1
    within = running_min[upper - 1] * (1.0 + energy_tolerance)
    chosen = next(i + 1 for i in range(upper) if curve[i] <= within)
    if chosen < upper:
        limit = "energy"
    return Decision(
        batch_size=chosen,
        limited_by=limit,
        joules_per_token=curve[chosen - 1],
        expected_latency_s=_expected_latency_s(profile, chosen, demand, window_s),
        kv_limit=kv_limit,
    )


def window_length_s(
    *,
    arrival_rate_per_s: float,
    target: int,
    window_min_s: float,
    window_max_s: float,
    slo_slack_s: float,
) -> float:
    """How long a window that has just opened may stay open (see the module docstring)."""
    fill = min(1.0, arrival_rate_per_s * window_max_s / max(target, 1))
    length = window_min_s + (window_max_s - window_min_s) * fill
    return max(0.0, min(length, slo_slack_s))


def should_close(
    *, now_s: float, deadline_s: float, collected: int, target: int, arrival_rate_per_s: float
) -> bool:
    """Close the window now? True at the target, at the deadline, or when fewer than one more arrival
    is expected before the deadline."""
    if collected >= target or now_s >= deadline_s:
        return True
    return arrival_rate_per_s * (deadline_s - now_s) < 1.0


def window_closes_at_s(
    *,
    opened_s: float,
    now_s: float,
    collected: int,
    target: int,
    arrival_rate_per_s: float,
    window_min_s: float,
    window_max_s: float,
    slo_slack_s: float = math.inf,
) -> float:
    """When the window that opened at ``opened_s`` closes: ``now_s`` when it should close now (target
    reached, deadline passed, no further arrival expected), else its deadline. ``slo_slack_s``: how long
    after ``opened_s`` the SLO still leaves before the batch must start."""
    deadline_s = opened_s + window_length_s(
        arrival_rate_per_s=arrival_rate_per_s,
        target=target,
        window_min_s=window_min_s,
        window_max_s=window_max_s,
        slo_slack_s=slo_slack_s,
    )
    if should_close(
        now_s=now_s,
        deadline_s=deadline_s,
        collected=collected,
        target=target,
        arrival_rate_per_s=arrival_rate_per_s,
    ):
        return now_s
    return deadline_s

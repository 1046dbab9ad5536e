"""The engine model behind `ecobatch tune`: it reproduces what the release-policy study measured on an
H200, and its static and continuous engines obey their definitions."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from ecobatch.config import BatchingSettings
from ecobatch.profile import EnergyProfile, profile_from_mapping
from ecobatch.tools.bench.workload import Arrival, parse_lengths, poisson
from ecobatch.tools.tune.sim import (
    BatcherRule,
    Controller,
    HoldWhileIdle,
    SendAtOnce,
    simulate_continuous,
    simulate_static,
)

LENGTHS = parse_lengths("choice:16,32,64,128,256,512", "x")
ONE = parse_lengths("1", "x")


def relative_joules(profile: EnergyProfile, policy: object, rate: float, seeds: int = 5) -> float:
    ratios = []
    for seed in range(seeds):
        arrivals = poisson(rate, ONE, LENGTHS, duration_s=300.0, count=None, seed=seed)
        base = simulate_continuous(profile, arrivals, SendAtOnce())
        ratios.append(simulate_continuous(profile, arrivals, policy).joules / base.joules)  # type: ignore[arg-type]
    return statistics.fmean(ratios)


def _measured_on_h200() -> list[tuple[float, float]]:
    """Hold H s while idle on an H200 at 4 req/s: J/request over sending at once, from the raw file."""
    raw = Path(__file__).parents[2] / "benchmarks/results/h200-release-policy/h200-release-policy-4rps.json"
    phases = json.loads(raw.read_text())["phases"]
    at_once = statistics.fmean(p["j_per_request"] for p in phases if p["hold_s"] == 0.0)
    return [(p["hold_s"], p["j_per_request"] / at_once) for p in phases if p["hold_s"] > 0]


@pytest.mark.parametrize(("hold_s", "measured_on_h200"), _measured_on_h200())
def test_it_reproduces_the_h200_hold_while_idle_rows_within_three_points(
    continuous_profile: EnergyProfile, hold_s: float, measured_on_h200: float
) -> None:
    """vLLM 0.26 bf16 on an H200 at 4 req/s, holding arrivals only while idle (the ecobatch developers'
    release-policy study: 0.91 / 0.85 / 0.75 of the J/request of sending at once)."""
    modelled = relative_joules(continuous_profile, HoldWhileIdle(hold_s), rate=4.0)
    assert modelled == pytest.approx(measured_on_h200, abs=0.03)


def test_near_saturation_holding_buys_nothing(continuous_profile: EnergyProfile) -> None:
    assert relative_joules(continuous_profile, HoldWhileIdle(1.0), rate=12.0, seeds=2) == pytest.approx(
        1.0, abs=0.02
    )


FLAT = profile_from_mapping(
    {
        "kind": "continuous",
        "idle_power_w": 100,
        "points": [
            {"concurrency": 1, "tokens_per_s": 10, "power_w": 200, "joules_per_token": 20},
            {"concurrency": 4, "tokens_per_s": 40, "power_w": 200, "joules_per_token": 5},
        ],
    }
)


def test_one_request_alone_decodes_at_the_single_sequence_rate_and_power() -> None:
    result = simulate_continuous(FLAT, [Arrival(1.0, 1, 50)], SendAtOnce())
    assert result.latencies_s == pytest.approx((5.0,))  # 50 tokens at 10 tok/s
    assert result.joules == pytest.approx(100 * 1.0 + 200 * 5.0)  # idle for 1 s, then 5 s at 200 W
    assert (result.busy_s, result.sequence_seconds) == pytest.approx((5.0, 5.0))


def test_the_controller_releases_while_busy_and_never_exceeds_its_limit() -> None:
    """Per-sequence speed: 10 tok/s alone, 12.5 with two in flight (25 tok/s between the points, log2).
    No budget to hold with (0 ms), a hard limit of 2 in flight."""
    arrivals = [Arrival(0.0, 1, 100), Arrival(0.1, 1, 10), Arrival(0.2, 1, 10), Arrival(0.3, 1, 10)]
    settings = BatchingSettings(interactive_budget_ms=0, max_inflight_sequences=2)
    result = simulate_continuous(FLAT, arrivals, Controller(settings))
    # A starts at once; B joins it (busy: at once) and ends at 0.9; C waits for B's slot (0.9 -> 1.7),
    # D for C's (1.7 -> 2.5); A, 31 tokens in by then, finishes its 69 alone by 9.4
    assert result.latencies_s == pytest.approx((9.4, 0.8, 1.5, 2.2))
    assert result.waits_s == pytest.approx((0.0, 0.0, 0.7, 1.4))
    assert result.sequence_seconds == pytest.approx(9.4 + 0.8 * 3)  # A 9.4 s in flight, B, C, D 0.8 s each


def test_a_static_batch_runs_as_long_as_its_longest_request() -> None:
    profile = profile_from_mapping(
        {
            "kind": "static",
            "points": [
                {"batch_size": 1, "tokens_per_s": 10, "power_w": 100, "joules_per_token": 10},
                {"batch_size": 2, "tokens_per_s": 20, "power_w": 120, "joules_per_token": 6},
            ],
        }
    )
    arrivals = [Arrival(0.0, 1, 10), Arrival(0.0, 1, 30)]
    result = simulate_static(profile, arrivals, BatcherRule(0.0, 0.0, batch_size=2))
    assert sorted(result.latencies_s) == pytest.approx([3.0, 3.0])  # 30 steps of 0.1 s, together
    assert result.joules == pytest.approx(120 * 3.0)
    assert (result.busy_s, result.sequence_seconds) == pytest.approx((3.0, 6.0))


def test_a_static_engine_past_its_capacity_queues_and_time_never_runs_backwards() -> None:
    profile = profile_from_mapping(
        {
            "kind": "static",
            "points": [{"batch_size": 1, "tokens_per_s": 10, "power_w": 100, "joules_per_token": 10}],
        }
    )
    arrivals = [Arrival(0.1 * k, 1, 10) for k in range(20)]  # one every 0.1 s, each needs 1 s alone
    result = simulate_static(profile, arrivals, BatcherRule(0.0, 0.0, batch_size=1))
    assert result.seconds == pytest.approx(20.0)  # 20 requests, one after the other, from t = 0
    assert max(result.latencies_s) == pytest.approx(20.0 - 1.9)

"""The adaptive window rule, driven by a fake clock (plain numbers: no sleeping)."""

from __future__ import annotations

import pytest

from ecobatch.serving.arrivals import ArrivalRate
from ecobatch.serving.policy import should_close, window_length_s

MIN_S, MAX_S = 0.05, 0.1


def length(rate: float, target: int = 32, slack: float = 10.0) -> float:
    return window_length_s(
        arrival_rate_per_s=rate, target=target, window_min_s=MIN_S, window_max_s=MAX_S, slo_slack_s=slack
    )


def test_an_idle_queue_gets_the_shortest_window() -> None:
    assert length(0.0) == pytest.approx(MIN_S)


def test_the_window_lengthens_toward_the_maximum_under_load() -> None:
    lengths = [length(rate) for rate in (0, 40, 160, 320, 10_000)]
    assert lengths == sorted(lengths)
    assert lengths[-1] == pytest.approx(MAX_S)
    assert MIN_S < lengths[2] < MAX_S


def test_the_window_never_runs_past_the_slo_slack() -> None:
    assert length(10_000, slack=0.02) == pytest.approx(0.02)
    assert length(10_000, slack=-1.0) == 0.0


def test_it_closes_when_the_target_is_reached() -> None:
    assert should_close(now_s=0.0, deadline_s=1.0, collected=8, target=8, arrival_rate_per_s=1e6)


def test_it_closes_at_the_deadline() -> None:
    assert should_close(now_s=1.0, deadline_s=1.0, collected=1, target=8, arrival_rate_per_s=1e6)


def test_it_closes_early_when_no_further_arrival_is_expected() -> None:
    # 10 req/s and 50 ms left: 0.5 arrivals expected, waiting cannot grow the batch
    assert should_close(now_s=0.0, deadline_s=0.05, collected=1, target=8, arrival_rate_per_s=10.0)


def test_it_keeps_waiting_while_arrivals_are_expected() -> None:
    # 100 req/s and 50 ms left: 5 arrivals expected
    assert not should_close(now_s=0.0, deadline_s=0.05, collected=1, target=8, arrival_rate_per_s=100.0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def advance(self, s: float) -> float:
        self.t += s
        return self.t


def test_arrival_rate_follows_a_steady_stream() -> None:
    clock, rate = FakeClock(), ArrivalRate()
    for _ in range(50):
        rate.observe(clock.advance(0.01))
    assert rate.per_s(clock.t) == pytest.approx(100.0)


def test_arrival_rate_is_zero_before_two_arrivals() -> None:
    rate = ArrivalRate()
    assert rate.per_s(0.0) == 0.0
    rate.observe(0.0)
    assert rate.per_s(0.0) == 0.0


def test_arrival_rate_decays_during_a_lull() -> None:
    clock, rate = FakeClock(), ArrivalRate()
    for _ in range(50):
        rate.observe(clock.advance(0.01))
    clock.advance(2.0)
    assert rate.per_s(clock.t) == pytest.approx(0.5)


def test_a_burst_after_a_lull_raises_the_rate_again() -> None:
    clock, rate = FakeClock(), ArrivalRate()
    rate.observe(clock.t)
    rate.observe(clock.advance(5.0))
    slow = rate.per_s(clock.t)
    for _ in range(30):
        rate.observe(clock.advance(0.001))
    assert rate.per_s(clock.t) > 50 * slow


def test_recent_rate_averages_bursts_over_its_window() -> None:
    from ecobatch.serving.arrivals import RecentRate

    rate = RecentRate(window_s=10.0)
    for batch in range(20):  # 4 completions at once every 0.5 s: 8 per second
        for _ in range(4):
            rate.observe(100.0 + 0.5 * batch)
    assert rate.per_s(110.0) == pytest.approx(8.0, rel=0.1)
    assert rate.per_s(125.0) == 0.0, "nothing in the last 10 s"
    assert RecentRate().per_s(0.0) == 0.0

"""The energy counter's lag: measured from bursts of work, and undone by the meter, so that a request's
energy lands on it and not on the request after it."""

from __future__ import annotations

import math

import pytest

from ecobatch.clock import FakeClock
from ecobatch.domain import Usage
from ecobatch.energy.counters import NvmlCounters
from ecobatch.energy.gpu import FakeGpu
from ecobatch.energy.ledger import Ledger, LedgerReports, SettledRequest
from ecobatch.energy.meter import Meter
from ecobatch.tools.calibrate.lag import LagEstimate, lag_from_trace

IDLE_W = 100.0


def drawn_joules(t_s: float, bursts: list[tuple[float, float, float]]) -> float:
    """What a GPU at IDLE_W with ``bursts`` ((start, end, watts above idle)) drew from 0 to ``t_s``."""
    return IDLE_W * t_s + sum(w * max(0.0, min(t_s, b) - a) for a, b, w in bursts)


def lagging_trace(
    bursts: list[tuple[float, float, float]], lag_s: float, step_s: float, until_s: float
) -> list[tuple[float, float]]:
    """A counter read every 5 ms that reports, in steps of ``step_s``, the energy drawn ``lag_s`` ago."""
    trace = []
    for i in range(int(until_s / 0.005)):
        t = i * 0.005
        reported_until = math.floor(max(0.0, t - lag_s) / step_s) * step_s
        trace.append((t, drawn_joules(reported_until, bursts)))
    return trace


@pytest.mark.parametrize(("lag_s", "step_s"), [(0.0, 0.02), (0.25, 0.02), (0.25, 0.1), (0.6, 0.05)])
def test_the_lag_is_read_off_the_edges_of_bursts(lag_s: float, step_s: float) -> None:
    """What a reading lags by on average: the counter's delay plus half its step (a meter reading at a
    moment unrelated to the counter's steps finds its last move half a step back, on average)."""
    bursts = [(1.0, 2.5, 400.0), (4.0, 5.2, 250.0), (7.0, 8.5, 500.0)]
    trace = lagging_trace(bursts, lag_s, step_s, until_s=10.0)
    estimate = lag_from_trace(trace, [(a, b) for a, b, _ in bursts], IDLE_W)
    assert estimate.lag_s == pytest.approx(lag_s + step_s / 2, abs=0.01)
    assert len(estimate.rise_delays_s) == len(estimate.fall_delays_s) == 3


def test_a_meter_takes_the_lag_within_its_settings_range() -> None:
    """A start-up delay longer than the lag reads slightly negative; a profile and the meter hold 0-5 s."""
    assert LagEstimate(-0.0047, (0.01,), (-0.02,)).meter_lag_s == 0.0
    assert LagEstimate(0.31, (0.3,), (0.32,)).meter_lag_s == 0.31
    assert LagEstimate(7.0, (7.0,), (7.0,)).meter_lag_s == 5.0


def test_no_burst_above_idle_is_an_error_not_a_lag() -> None:
    trace = lagging_trace([], 0.2, 0.02, until_s=5.0)
    with pytest.raises(ValueError, match="no burst"):
        lag_from_trace(trace, [(1.0, 2.0)], IDLE_W)


async def back_to_back(
    counter_lag_s: float, delay_s: float = 0.3, step_s: float = 0.0
) -> dict[str, SettledRequest]:
    """Request a (300 W above idle for 1 s) then at once request b (100 W above idle for 1 s), on a GPU
    whose counter reports the energy ``delay_s`` late (in steps of ``step_s``, if any); the meter, which
    samples every 50 ms, told ``counter_lag_s``."""
    clock = FakeClock()

    def reported_mj(t_s: float) -> int:  # since boot, long before: idle until the first request
        return round(1000 * (5000.0 + drawn_joules(t_s - 0.3, bursts)))

    bursts = [(0.0, 1.0, 300.0), (1.0, 2.0, 100.0)]
    gpu = FakeGpu(0, energy_mj=reported_mj(0.0), power_w=IDLE_W)
    settled: dict[str, SettledRequest] = {}
    reports = LedgerReports(settled=lambda done: settled.update({s.request_id: s for s in done}))
    ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock, live_idle=False, reports=reports)
    counter = NvmlCounters([gpu])
    meter = Meter(ledger, counter, sample_interval_s=3600.0, idle_power_w=IDLE_W, counter_lag_s=counter_lag_s)
    await meter.start()
    spans = {"a": ledger.begin("a"), "b": None}
    t0 = clock.now()
    for step in range(1, 81):  # 4 s in steps of 50 ms
        await clock.advance(0.05)
        t = step * 0.05
        gpu.energy_mj = reported_mj(t)
        for name, (a, b, _) in zip("ab", bursts, strict=True):
            span = spans[name]
            if span is not None and a < t <= b + 1e-9:
                span.generated(1)  # one token every 50 ms while it runs
        if math.isclose(t, 1.0):
            spans["a"].end(Usage(0, 20))
            spans["b"] = ledger.begin("b")
        if math.isclose(t, 2.0):
            spans["b"].end(Usage(0, 20))
        await meter.sample()
    assert clock.now() - t0 == pytest.approx(4.0)
    await meter.close()
    return settled


async def test_a_late_counter_charges_a_request_for_its_own_energy_once_its_lag_is_known() -> None:
    settled = await back_to_back(counter_lag_s=0.3)
    assert settled["a"].joules == pytest.approx(300.0, rel=0.02)
    assert settled["b"].joules == pytest.approx(100.0, rel=0.02)


async def test_a_late_counter_left_uncorrected_moves_energy_to_the_next_request() -> None:
    settled = await back_to_back(counter_lag_s=0.0)
    assert settled["a"].joules < 300.0 * 0.8  # its last 0.3 s landed on b
    assert settled["b"].joules > 100.0 * 1.5


async def test_another_clients_sequences_go_with_the_energy_drawn_beside_them() -> None:
    """A counter 0.3 s late: an interval placed back at [t - 0.3, ...] carries the other client's count
    read then, not the one read when the counter reported it."""
    clock = FakeClock()
    gpu = FakeGpu(0, energy_mj=0, power_w=IDLE_W)
    seen: list[tuple[float, float, float]] = []

    class Recording(Ledger):
        def add_interval(self, t0_s: float, t1_s: float, joules: float | None, other: float = 0.0) -> None:
            seen.append((round(t0_s, 3), round(t1_s, 3), other))

    ledger = Recording(source="nvml", prefill_weight=1.0, clock=clock)
    meter = Meter(
        ledger, NvmlCounters([gpu]), sample_interval_s=3600.0, idle_power_w=IDLE_W, counter_lag_s=0.3
    )
    await meter.start()
    meter.others_in_flight = lambda: 2.0 if 1.0 <= clock.now() < 1.5 else 0.0
    for _ in range(40):  # 2 s in steps of 50 ms, the counter moving every time
        await clock.advance(0.05)
        gpu.energy_mj = (gpu.energy_mj or 0) + 5_000
        await meter.sample()
    others = {round(t0, 2): n for t0, _, n in seen}
    assert others[1.0] == 2.0  # drawn at 1.0-1.05 s, reported at 1.3-1.35 s
    assert others[1.5] == 0.0  # drawn after the other client stopped
    assert others[0.9] == 0.0  # drawn before it started
    await meter.close()


async def test_a_meter_closed_without_its_last_reading_reports_nothing_more() -> None:
    """A replica refused while joining: its GPU never served, so its meter exports no energy."""
    clock = FakeClock()
    gpu = FakeGpu(0, energy_mj=1_000_000, power_w=IDLE_W)
    ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock)
    meter = Meter(ledger, NvmlCounters([gpu]), sample_interval_s=3600.0, idle_power_w=IDLE_W)
    await meter.start()
    await clock.advance(0.5)
    gpu.energy_mj = (gpu.energy_mj or 0) + 50_000
    await meter.close(last_reading=False)
    assert ledger.totals.counter_joules == 0.0

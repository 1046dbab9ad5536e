"""How sure a receipt is: the energy the counter's timing cannot place across a request's start and end
(its above-idle power at each edge × the counter's resolution), where that resolution is known."""

from __future__ import annotations

import pytest

from ecobatch.clock import FakeClock
from ecobatch.domain import Usage
from ecobatch.energy.counters import NvmlCounters
from ecobatch.energy.gpu import FakeGpu
from ecobatch.energy.ledger import Ledger, LedgerReports, SettledRequest
from ecobatch.energy.meter import Meter


async def one_request(ledger: Ledger, clock: FakeClock, settled: dict[str, SettledRequest]) -> SettledRequest:
    """A request from 0.05 s to 0.95 s drawing 100 W above an idle of 50 W, in intervals of 100 ms."""
    await clock.advance(0.05)
    span = ledger.begin("r")
    for k in range(10):  # the intervals [0.1 k, 0.1 (k + 1)): the request runs 50 ms of the first and last
        await clock.advance(0.05 if k in (0, 9) else 0.1)
        if k == 9:
            span.end(Usage(0, 10))
            await clock.advance(0.05)
        running_s = 0.05 if k in (0, 9) else 0.1
        ledger.add_interval(0.1 * k, 0.1 * (k + 1), 50.0 * 0.1 + 100.0 * running_s)
    await clock.advance(0.1)
    ledger.add_interval(1.0, 1.1, 5.0)
    return settled["r"]


def ledger_with(source: str, clock: FakeClock, settled: dict[str, SettledRequest]) -> Ledger:
    def record(batch: list[SettledRequest]) -> None:
        settled.update({s.request_id: s for s in batch})

    return Ledger(
        source=source,
        prefill_weight=1.0,
        idle_power_w=50.0,
        clock=clock,
        reports=LedgerReports(settled=record),
    )


async def test_the_edges_at_the_counters_resolution_are_what_a_receipt_is_unsure_of() -> None:
    clock, settled = FakeClock(), {}
    ledger = ledger_with("nvml", clock, settled)
    ledger.set_counter_resolution(0.1)
    receipt = await one_request(ledger, clock, settled)
    assert receipt.joules == pytest.approx(90.0)
    # at each edge: 100 W above idle × 0.1 s, at most the 5 J it was charged in that interval
    assert receipt.uncertainty_joules == pytest.approx(5.0 + 5.0)


async def test_a_coarser_counter_makes_a_receipt_less_sure() -> None:
    clock, settled = FakeClock(), {}
    ledger = ledger_with("nvml", clock, settled)
    ledger.set_counter_resolution(0.02)
    receipt = await one_request(ledger, clock, settled)
    assert receipt.uncertainty_joules == pytest.approx(2 * 100.0 * 0.02)


async def test_no_uncertainty_is_claimed_where_the_counters_timing_is_unknown() -> None:
    clock, settled = FakeClock(), {}
    receipt = await one_request(ledger_with("nvml", clock, settled), clock, settled)
    assert receipt.uncertainty_joules is None


async def test_the_meter_gives_the_ledger_the_counters_resolution_as_it_sees_it_move() -> None:
    """A counter that moves on every third reading of a meter sampling every 50 ms: 150 ms."""
    clock = FakeClock()
    gpu = FakeGpu(0, energy_mj=1_000_000, power_w=100.0)
    ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock)
    meter = Meter(ledger, NvmlCounters([gpu]), sample_interval_s=0.05, idle_power_w=100.0)
    await meter.start()
    assert ledger.counter_resolution_s is None  # not yet seen moving: receipts claim no uncertainty
    for reading in range(1, 31):
        await clock.advance(0.05)
        if reading % 3 == 0:
            gpu.energy_mj = (gpu.energy_mj or 0) + 15_000
        await meter.sample()
    assert ledger.counter_resolution_s == pytest.approx(0.15)
    await meter.close()


async def test_a_request_inside_one_interval_is_unsure_of_at_most_its_charge() -> None:
    clock, settled = FakeClock(), {}
    ledger = ledger_with("nvml", clock, settled)
    ledger.set_counter_resolution(0.1)
    await clock.advance(0.02)
    span = ledger.begin("r")
    await clock.advance(0.03)
    span.end(Usage(0, 3))
    await clock.advance(0.05)
    ledger.add_interval(0.0, 0.1, 5.0 + 3.0)  # 3 J above idle, all in its 30 ms
    await clock.advance(0.1)
    ledger.add_interval(0.1, 0.2, 5.0)
    assert settled["r"].joules == pytest.approx(3.0)
    assert settled["r"].uncertainty_joules == pytest.approx(3.0)

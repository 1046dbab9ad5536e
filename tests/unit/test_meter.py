"""The meter: counters read in the background, turned into intervals for the ledger; NVML on a
scripted GPU and dcgm-exporter served by a small exporter the test runs. Conservation is checked
against the counter's own delta."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from ecobatch.clock import FakeClock
from ecobatch.domain import Usage
from ecobatch.energy.counters import CounterDeltas, NvmlCounters
from ecobatch.energy.dcgm import DcgmCounters, DcgmUnavailable, parse_dcgm
from ecobatch.energy.gpu import FakeGpu
from ecobatch.energy.ledger import Ledger, LedgerReports, SettledRequest
from ecobatch.energy.meter import Meter
from tests.fakes import FakeDcgmExporter


def meter_for(
    reader: Any,
    clock: FakeClock,
    idle_power_w: float | None = None,
    settled: list[SettledRequest] | None = None,
) -> Meter:
    """A meter on ``reader`` whose ledger reports the requests it settles into ``settled``."""
    reports = LedgerReports(settled=settled.extend) if settled is not None else None
    ledger = Ledger(source=reader.source, prefill_weight=1.0, clock=clock, reports=reports)
    # an interval far longer than any test: the tests call sample() themselves
    return Meter(ledger, reader, sample_interval_s=3600.0, idle_power_w=idle_power_w, idle_probe_s=0.0)


async def overlapping_traffic(meter: Meter, clock: FakeClock, spend: Callable[[float], None]) -> None:
    """Random overlapping continuous requests (streams, plain, failed) while the GPU spends energy."""
    rng = random.Random(11)
    spans = []
    for step in range(300):
        await clock.advance(0.02)
        spend(rng.uniform(2.0, 14.0))  # 100-700 W over 20 ms
        if rng.random() < 0.25:
            spans.append(meter.ledger.begin(f"r{step}"))
        for span in list(spans):
            if rng.random() < 0.5:
                span.generated(1)
            if rng.random() < 0.05:
                span.end(Usage(rng.randrange(100), rng.randrange(1, 300)) if rng.random() < 0.8 else None)
                spans.remove(span)
        if step % 5 == 0:
            await meter.sample()
    for span in spans:
        span.end(None)
    await meter.close()


async def test_nvml_overlapping_requests_add_up_to_the_counter_delta() -> None:
    clock = FakeClock()
    gpus = [FakeGpu(0, energy_mj=7_000_000, power_w=118.0), FakeGpu(1, energy_mj=3_000, power_w=118.0)]
    settled: list[SettledRequest] = []
    meter = meter_for(NvmlCounters(gpus), clock, settled=settled)
    await meter.start()
    assert meter.ledger.idle_power_w == pytest.approx(236.0)  # probed from power: the counter stood still
    start_mj = sum(g.energy_mj or 0 for g in gpus)

    def spend(joules: float) -> None:
        for g in gpus:
            g.energy_mj = (g.energy_mj or 0) + int(joules * 500)

    await overlapping_traffic(meter, clock, spend)
    delta_j = (sum(g.energy_mj or 0 for g in gpus) - start_mj) / 1000.0
    totals = meter.ledger.totals
    accounted = sum(s.joules for s in settled) + totals.idle_joules + totals.unattributed_joules
    assert accounted == pytest.approx(delta_j, rel=1e-3)
    assert meter.ledger.pending_requests == 0
    assert {s.source for s in settled} == {"nvml"} and meter.gpu == "0+1"


async def test_dcgm_overlapping_requests_add_up_to_the_exporters_counter(aiohttp_server: Any) -> None:
    exporter = FakeDcgmExporter({("gpu-node", "0"): 5e9, ("gpu-node", "1"): 1e9, ("other-node", "0"): 0.0})
    server = await aiohttp_server(exporter.app())
    clock = FakeClock()
    reader = DcgmCounters(str(server.make_url("/metrics")), labels={"Hostname": "gpu-node"})
    settled: list[SettledRequest] = []
    meter = meter_for(reader, clock, settled=settled)
    await meter.start()
    assert meter.gpu == "gpu-node/0+gpu-node/1"
    assert meter.ledger.idle_power_w == pytest.approx(240.0)  # two selected GPUs at 120 W
    start = sum(v for (host, _), v in exporter.energy_mj.items() if host == "gpu-node")

    def spend(joules: float) -> None:
        exporter.add_joules(joules, host="gpu-node")
        exporter.add_joules(1000.0, host="other-node")  # another host's GPU: never ours

    await overlapping_traffic(meter, clock, spend)
    delta_j = (sum(v for (host, _), v in exporter.energy_mj.items() if host == "gpu-node") - start) / 1000.0
    totals = meter.ledger.totals
    accounted = sum(s.joules for s in settled) + totals.idle_joules + totals.unattributed_joules
    assert accounted == pytest.approx(delta_j, rel=1e-3)
    assert {s.source for s in settled} == {"dcgm"}


async def test_an_interval_is_extended_while_the_counter_stands_still() -> None:
    clock, gpu = FakeClock(), FakeGpu(energy_mj=0)
    settled: list[SettledRequest] = []
    meter = meter_for(NvmlCounters([gpu]), clock, idle_power_w=0.0, settled=settled)
    await meter.start()
    span = meter.ledger.begin("r")
    await clock.advance(0.1)
    await meter.sample()  # the counter has not updated yet: no interval
    assert settled == []
    span.end(Usage(0, 10))
    await clock.advance(0.1)
    gpu.energy_mj = 30_000  # the update covers the whole 0.2 s
    await meter.sample()
    assert [s.joules for s in settled] == pytest.approx([30.0])
    await meter.close()


async def test_a_counter_that_goes_backwards_is_skipped_not_negative() -> None:
    deltas = CounterDeltas()
    assert deltas.delta({"0": 1000.0, "1": 50.0}) == 0.0  # first reading: the baseline
    assert deltas.delta({"0": 10.0, "1": 60.0}) == pytest.approx(10.0)  # GPU 0 reset: skipped
    assert deltas.delta({"0": 15.0, "1": 60.0}) == pytest.approx(5.0)
    assert deltas.delta({"1": 61.0}) == pytest.approx(1.0)  # a GPU missing from one reading


def test_a_gpu_without_a_counter_has_its_power_integrated() -> None:
    now = [0.0]
    gpu = FakeGpu(energy_mj=None, power_w=200.0)
    counters = NvmlCounters([gpu], clock=lambda: now[0])
    first = counters.read_now()["0"]
    now[0] = 2.0
    gpu.power_w = 300.0
    assert counters.read_now()["0"] - first == pytest.approx(500.0)  # trapezoid: (200 + 300) / 2 × 2 s


def test_dcgm_series_are_chosen_by_label_and_gpu_index() -> None:
    exporter = FakeDcgmExporter({("a", "0"): 1000.0, ("a", "1"): 2000.0, ("b", "0"): 4000.0}, power_w=100.0)
    reading = parse_dcgm(exporter.text(), labels={"Hostname": "a"}, gpu_indices=[1])
    assert reading.energy_joules == {"a/1": 2.0} and reading.power_w == 100.0
    assert reading.power_limit_w is None  # not exported by this exporter
    assert sum(parse_dcgm(exporter.text()).energy_joules.values()) == pytest.approx(7.0)


async def test_an_unreachable_or_empty_exporter_says_what_is_wrong(aiohttp_server: Any) -> None:
    exporter = FakeDcgmExporter({("a", "0"): 1.0})
    server = await aiohttp_server(exporter.app())
    reader = DcgmCounters(str(server.make_url("/metrics")), labels={"Hostname": "nope"})
    try:
        with pytest.raises(DcgmUnavailable, match="no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION series matching"):
            await reader.read()
    finally:
        await reader.close()
    reader = DcgmCounters("http://127.0.0.1:9/metrics")
    try:
        with pytest.raises(DcgmUnavailable, match="cannot be read"):
            await reader.read()
    finally:
        await reader.close()


async def test_idle_power_is_the_counters_rate_over_the_probe_when_it_moves() -> None:
    clock = FakeClock()

    class Scripted:
        """A 61 W GPU whose power readings (999 W) are wrong: the counter is the truth."""

        source, gpu = "nvml", "0"
        joules = 0.0

        async def read(self) -> dict[str, float]:
            return {"0": self.joules}

        async def power_w(self) -> float:
            await clock.advance(0.5)  # each reading takes half a second of the probe
            self.joules += 0.5 * 61.0
            return 999.0

        async def close(self) -> None:
            return None

    ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock)
    meter = Meter(ledger, Scripted(), sample_interval_s=3600.0, idle_probe_s=1.0)
    await meter.start()
    assert ledger.idle_power_w == pytest.approx(61.0)
    await meter.close()


async def test_an_unreadable_counter_becomes_a_gap_then_starts_afresh() -> None:
    clock = FakeClock()

    class Flaky:
        source, gpu = "dcgm", "node/0"
        joules, down = 0.0, False

        async def read(self) -> dict[str, float]:
            if self.down:
                raise OSError("connection refused")
            return {"node/0": self.joules}

        async def power_w(self) -> float:
            return 100.0

        def max_power_w(self) -> None:
            return None

        async def close(self) -> None:
            return None

    reader = Flaky()
    settled: list[SettledRequest] = []
    ledger = Ledger(
        source="dcgm", prefill_weight=1.0, clock=clock, reports=LedgerReports(settled=settled.extend)
    )
    meter = Meter(ledger, reader, sample_interval_s=3600.0, idle_power_w=0.0, max_stale_s=1.0)
    await meter.start()
    span = ledger.begin("during-outage")
    reader.down = True
    await clock.advance(0.5)
    await meter.sample()  # a short outage: nothing yet
    assert ledger.pending_intervals == 0 and not meter.readable
    span.end(Usage(1, 4))
    await clock.advance(0.7)
    await meter.sample()  # unreadable for 1.2 s > max_stale_s: a gap
    assert [(s.request_id, s.complete) for s in settled] == [("during-outage", False)]
    reader.down, reader.joules = False, 5_000.0  # back, with energy that cannot be placed
    await clock.advance(0.3)
    await meter.sample()
    assert meter.readable and ledger.totals.counter_joules == 0.0
    after = ledger.begin("after")
    await clock.advance(0.2)
    after.end(Usage(1, 4))
    reader.joules += 30.0
    await clock.advance(0.1)
    await meter.sample()
    assert (settled[-1].request_id, settled[-1].complete) == ("after", True)
    assert settled[-1].joules == pytest.approx(30.0)
    assert ledger.totals.unmeasured_s == pytest.approx(1.5)
    await meter.close()


async def test_a_counter_unreadable_at_start_takes_the_fallback_idle_power_and_is_named_when_it_reads() -> (
    None
):
    """A replica still loading at start-up: its exporter series is not there yet. Its idle power is the
    profile's (not 0 W: its idle joules would pass for another client's), and its GPUs get their name and
    power limit at the first reading."""
    clock = FakeClock()

    class Late:
        source, gpu = "dcgm", "dcgm"
        up = False

        async def read(self) -> dict[str, float]:
            if not self.up:
                raise OSError("no such series yet")
            self.gpu = "node/1"
            return {"node/1": 1_000.0}

        async def power_w(self) -> float:
            return 120.0

        def max_power_w(self) -> float:
            return 700.0

        async def close(self) -> None:
            return None

    reader = Late()
    ledger = Ledger(source="dcgm", prefill_weight=1.0, clock=clock)
    meter = Meter(
        ledger, reader, sample_interval_s=3600.0, idle_probe_s=0.0, gpu_prefix="r1:", idle_fallback_w=121.8
    )
    named: list[str] = []
    meter.on_named = lambda: named.append(meter.gpu)  # the runtime checks GPU sharing again here
    await meter.start()
    assert ledger.idle_power_w == 121.8 and meter.gpu == "r1:dcgm" and ledger.max_power_w is None
    reader.up = True
    await clock.advance(0.1)
    await meter.sample()
    assert meter.gpu == "r1:node/1" and ledger.max_power_w == 700.0
    assert named == ["r1:node/1"]
    await meter.close()

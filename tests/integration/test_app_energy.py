"""Energy through the whole app, measured by the NVML meter on a fake GPU whose counter runs in real
time: responses are not held for the meter, and what the receipts, the idle and the other-work buckets
hold adds up to the counter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ecobatch.clock import Clock
from ecobatch.config import load_settings
from ecobatch.energy.choose import MeterSpec
from ecobatch.energy.counters import NvmlCounters
from ecobatch.energy.ledger import Ledger, LedgerReports
from ecobatch.energy.meter import Meter
from ecobatch.profile import EnergyProfile
from ecobatch.serving.app import RUNTIME, create_app
from tests.fakes import BurningGpu, FakeContinuousEngine


class RecordingCounters(NvmlCounters):
    """The NVML reader, keeping every reading it hands the meter (to check against the counter)."""

    readings: list[float]

    def read_now(self) -> dict[str, float]:
        reading = super().read_now()
        self.readings.append(sum(reading.values()))
        return reading


def nvml_meter_on(
    gpu: BurningGpu, counters: list[RecordingCounters] | None = None, sample_interval_s: float = 0.1
) -> Any:
    def factory(spec: MeterSpec, profile: EnergyProfile, clock: Clock, reports: LedgerReports) -> Meter:
        reader = RecordingCounters([gpu])
        reader.readings = []
        if counters is not None:
            counters.append(reader)
        ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock, reports=reports)
        return Meter(ledger, reader, sample_interval_s=sample_interval_s, idle_power_w=50.0)

    return factory


async def test_a_response_is_not_held_for_the_meter(
    aiohttp_client: Any, continuous_profile: EnergyProfile
) -> None:
    """With the NVML meter sampling only every 30 s, 30 requests on an instant engine are all answered
    between two samples: no response waits for the counter. Their receipts settle at the next sample
    (here the last one, when the app closes)."""
    counters: list[RecordingCounters] = []
    app = create_app(
        load_settings(None, {"batching.interactive_budget_ms": 0.0}),
        engine=FakeContinuousEngine(instant=True),
        profile=continuous_profile,
        meter_factory=nvml_meter_on(BurningGpu(power_w=300.0), counters, sample_interval_s=30.0),
    )
    client = await aiohttp_client(app)
    async with asyncio.timeout(10):
        while not counters or not counters[0].readings:  # the meter's first reading, at start
            await asyncio.sleep(0.01)
    samples_before = len(counters[0].readings)
    ids = []
    for i in range(30):
        resp = await client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4})
        assert resp.status == 200
        assert resp.headers["X-Ecobatch-Energy-Source"] == "nvml"
        ids.append(resp.headers["X-Ecobatch-Request-Id"])
    assert len(counters[0].readings) == samples_before, "a response waited for a meter sample"
    runtime = app[RUNTIME]
    assert all(runtime.receipts.get(i)["status"] == "pending" for i in ids)  # type: ignore[index]
    await client.close()  # the meter's last interval settles them
    receipts = [runtime.receipts.get(i) for i in ids]
    assert all(r is not None and r["status"] == "settled" and r["source"] == "nvml" for r in receipts)


async def test_measured_energy_adds_up_to_the_counter_through_the_app(
    aiohttp_client: Any, continuous_profile: EnergyProfile
) -> None:
    gpu = BurningGpu(power_w=400.0)
    engine = FakeContinuousEngine()
    readers: list[RecordingCounters] = []
    app = create_app(
        load_settings(None, {"batching.interactive_budget_ms": 0.0}),
        engine=engine,
        profile=continuous_profile,
        meter_factory=nvml_meter_on(gpu, readers),
    )
    client = await aiohttp_client(app)

    async def one(name: str, after_s: float) -> None:
        resp_task = asyncio.ensure_future(
            client.post("/v1/completions", json={"prompt": name, "max_tokens": 8})
        )
        await asyncio.sleep(after_s)
        engine.finish(name)
        assert (await resp_task).status == 200

    await asyncio.gather(*(one(f"r{i}", 0.05 + 0.03 * i) for i in range(8)))
    await asyncio.sleep(0.3)  # idle time, then the meter closes with the app
    ledger = app[RUNTIME].meter.ledger  # type: ignore[union-attr]
    await client.close()  # runs the app's cleanup: the dispatcher, then the meter's last interval
    readings = readers[0].readings
    delta_j = readings[-1] - readings[0]  # the counter, from the meter's first reading to its last
    totals = ledger.totals
    accounted = totals.settled_request_joules + totals.idle_joules + totals.unattributed_joules
    assert delta_j > 0
    assert accounted == pytest.approx(delta_j, rel=1e-9)
    assert totals.settled_request_joules > 0 and totals.idle_joules > 0

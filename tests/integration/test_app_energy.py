"""Energy through the whole app, measured by the NVML meter on a fake GPU whose counter runs in real
time: responses are not held for the meter, and what the receipts, the idle and the other-work buckets
hold adds up to the counter."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import pytest

from ecobatch.app import RUNTIME, create_app
from ecobatch.clock import Clock
from ecobatch.config import Settings, load_settings
from ecobatch.energy.counters import NvmlCounters
from ecobatch.energy.ledger import Ledger
from ecobatch.energy.meter import Meter
from ecobatch.profile import EnergyProfile
from tests.fakes import BurningGpu, FakeContinuousEngine
from tests.integration.helpers import metric


class RecordingCounters(NvmlCounters):
    """The NVML reader, keeping every reading it hands the meter (to check against the counter)."""

    readings: list[float]

    def read_now(self) -> dict[str, float]:
        reading = super().read_now()
        self.readings.append(sum(reading.values()))
        return reading


def nvml_meter_on(gpu: BurningGpu, counters: list[RecordingCounters] | None = None) -> Any:
    def factory(settings: Settings, profile: EnergyProfile, clock: Clock) -> Meter:
        reader = RecordingCounters([gpu])
        reader.readings = []
        if counters is not None:
            counters.append(reader)
        ledger = Ledger(source="nvml", gpu="0", prefill_weight=1.0, clock=clock)
        return Meter(ledger, reader, sample_interval_s=0.1, idle_power_w=50.0)

    return factory


async def median_latency_s(client: Any, n: int = 30) -> tuple[float, list[str], set[str]]:
    latencies_s, ids, sources = [], [], set()
    for i in range(n):
        t0 = time.perf_counter()
        resp = await client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4})
        assert resp.status == 200
        await resp.read()
        latencies_s.append(time.perf_counter() - t0)
        ids.append(resp.headers["X-Ecobatch-Request-Id"])
        sources.add(resp.headers["X-Ecobatch-Energy-Source"])
    return statistics.median(latencies_s), ids, sources


async def test_a_response_is_not_held_for_the_meter(
    aiohttp_client: Any, continuous_profile: EnergyProfile
) -> None:
    """An instant engine: with the NVML meter sampling every 0.1 s the median request takes at most
    5 ms more than with the modelled meter (which has no counter to wait for), not the ~50 ms wait
    for the next sample; the receipts settle afterwards."""
    settings = load_settings(None, {"batching.interactive_budget_ms": 0.0})
    modelled = await aiohttp_client(
        create_app(settings, engine=FakeContinuousEngine(instant=True), profile=continuous_profile)
    )
    baseline_s, _, sources = await median_latency_s(modelled)
    assert sources == {"model"}
    app = create_app(
        settings,
        engine=FakeContinuousEngine(instant=True),
        profile=continuous_profile,
        meter_factory=nvml_meter_on(BurningGpu(power_w=300.0)),
    )
    client = await aiohttp_client(app)
    median_s, ids, sources = await median_latency_s(client)
    assert sources == {"nvml"}
    assert median_s - baseline_s <= 0.005, f"median {median_s * 1000:.1f} ms vs {baseline_s * 1000:.1f} ms"

    runtime = app[RUNTIME]
    for _ in range(40):
        receipts = [runtime.receipts.get(i) for i in ids]
        if all(r is not None and r["status"] == "settled" for r in receipts):
            break
        await asyncio.sleep(0.05)
    assert all(r is not None and r["status"] == "settled" and r["source"] == "nvml" for r in receipts)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "ecobatch_request_energy_joules_count", source="nvml") == len(ids)


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

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


def nvml_meter_on(gpu: BurningGpu) -> Any:
    def factory(settings: Settings, profile: EnergyProfile, clock: Clock) -> Meter:
        ledger = Ledger(source="nvml", gpu="0", prefill_weight=1.0, clock=clock)
        return Meter(ledger, NvmlCounters([gpu]), sample_interval_s=0.1, idle_power_w=50.0)

    return factory


async def test_a_response_is_not_held_for_the_meter(
    aiohttp_client: Any, continuous_profile: EnergyProfile
) -> None:
    """An instant engine, the NVML meter sampling every 0.1 s: the median request takes a few
    milliseconds, not the wait for the next sample."""
    gpu = BurningGpu(power_w=300.0)
    settings = load_settings(None, {"batching.window_min_ms": 0.0, "batching.window_max_ms": 0.0})
    app = create_app(
        settings,
        engine=FakeContinuousEngine(instant=True),
        profile=continuous_profile,
        meter_factory=nvml_meter_on(gpu),
    )
    client = await aiohttp_client(app)
    latencies_s, ids = [], []
    for i in range(40):
        t0 = time.perf_counter()
        resp = await client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4})
        assert resp.status == 200
        await resp.read()
        latencies_s.append(time.perf_counter() - t0)
        ids.append(resp.headers["X-Ecobatch-Request-Id"])
        assert resp.headers["X-Ecobatch-Energy-Source"] == "nvml"
    assert statistics.median(latencies_s) <= 0.005, f"median {statistics.median(latencies_s) * 1000:.1f} ms"

    runtime = app[RUNTIME]
    for _ in range(40):
        receipts = [runtime.receipts.get(i) for i in ids]
        if all(r is not None and r["status"] == "settled" for r in receipts):
            break
        await asyncio.sleep(0.05)
    assert all(r is not None and r["status"] == "settled" and r["source"] == "nvml" for r in receipts)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "ecobatch_request_energy_joules_count", source="nvml") == 40


async def test_measured_energy_adds_up_to_the_counter_through_the_app(
    aiohttp_client: Any, continuous_profile: EnergyProfile
) -> None:
    gpu = BurningGpu(power_w=400.0)
    engine = FakeContinuousEngine()
    app = create_app(
        load_settings(None, {"batching.window_min_ms": 0.0, "batching.window_max_ms": 0.0}),
        engine=engine,
        profile=continuous_profile,
        meter_factory=nvml_meter_on(gpu),
    )
    client = await aiohttp_client(app)
    start_mj = gpu.total_energy_mj()

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
    delta_j = (gpu.total_energy_mj() - start_mj) / 1000.0
    totals = ledger.totals
    accounted = totals.settled_request_joules + totals.idle_joules + totals.unattributed_joules
    # the counter kept running for a moment after the meter's last reading at close
    assert accounted == pytest.approx(delta_j, rel=0.02)
    assert totals.settled_request_joules == pytest.approx(totals.attributed_joules, rel=1e-9)
    assert totals.idle_joules > 0

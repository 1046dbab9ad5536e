"""The NVML meter's interval attribution, on a scripted GPU and a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from ecobatch.energy import BatchEnergy, Span
from ecobatch.gpu import FakeGpu
from ecobatch.nvml_meter import NvmlMeter
from ecobatch.openai_api import Usage


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def meter_on(gpus: list[FakeGpu], clock: Clock, idle_power_w: float = 100.0) -> NvmlMeter:
    m = NvmlMeter(gpus, prefill_weight=1.0, idle_power_w=idle_power_w, clock=clock)
    m._read_baseline()  # start() without the background task: tests call sample() themselves
    return m


async def end_now(m: NvmlMeter, span: Span, usages: Sequence[Usage]) -> asyncio.Future[BatchEnergy]:
    """End the span at the current (fake) time; the result arrives once a later sample settles it."""
    future = asyncio.ensure_future(m.end(span, usages))
    await asyncio.sleep(0)
    return future


def tick(gpus: list[FakeGpu], clock: Clock, m: NvmlMeter, seconds: float, watts: float) -> None:
    clock.t += seconds
    for g in gpus:
        assert g.energy_mj is not None
        g.energy_mj += int(watts * seconds * 1000)
    m.sample()


async def test_a_span_gets_the_active_energy_and_idle_time_goes_to_the_idle_bucket() -> None:
    gpu, clock = FakeGpu(energy_mj=5_000_000), Clock()
    m = meter_on([gpu], clock)
    tick([gpu], clock, m, 1.0, 100.0)  # idle second: 100 J
    span = m.begin(concurrency=4)
    tick([gpu], clock, m, 2.0, 400.0)  # busy: 800 J
    energy_task = await end_now(m, span, [Usage(10, 30), Usage(10, 10)])
    tick([gpu], clock, m, 1.0, 100.0)  # idle again
    energy = await energy_task
    assert energy.total_joules == pytest.approx(800.0)
    assert energy.per_request_joules == pytest.approx(
        (800.0 * 40 / 60, 800.0 * 20 / 60)
    )  # 10+30 vs 10+10 tokens
    assert m.totals.idle_joules == pytest.approx(200.0)


async def test_attributed_plus_idle_equals_the_counter_delta() -> None:
    gpus, clock = [FakeGpu(0, energy_mj=10), FakeGpu(1, energy_mj=99)], Clock()
    m = meter_on(gpus, clock, idle_power_w=80.0)
    results = []
    for k in range(5):
        tick(gpus, clock, m, 0.13, 90.0)
        span = m.begin(concurrency=1 + k)
        clock.t += 0.05
        tick(gpus, clock, m, 0.2, 350.0 + 20 * k)
        pending = await end_now(m, span, [Usage(5, 7 + k)] * (1 + k))
        tick(gpus, clock, m, 0.07, 150.0)
        results.append(await pending)
    per_request = sum(sum(r.per_request_joules) for r in results)
    assert per_request + m.totals.idle_joules == pytest.approx(m.totals.counter_joules, rel=1e-9)
    assert m.totals.counter_joules == pytest.approx(sum(g.energy_mj for g in gpus) / 1000 - 0.109, rel=1e-9)


async def test_overlapping_spans_share_an_interval_by_time_and_sequences() -> None:
    gpu, clock = FakeGpu(energy_mj=0), Clock()
    m = meter_on([gpu], clock, idle_power_w=0.0)
    a = m.begin(concurrency=1)
    b = m.begin(concurrency=3)
    tick([gpu], clock, m, 1.0, 400.0)
    ea, eb = await end_now(m, a, [Usage(0, 1)]), await end_now(m, b, [Usage(0, 1)])
    tick([gpu], clock, m, 0.0, 0.0)
    assert (await ea).total_joules == pytest.approx(100.0)
    assert (await eb).total_joules == pytest.approx(300.0)


async def test_a_counter_that_goes_backwards_is_skipped_not_negative() -> None:
    gpu, clock = FakeGpu(energy_mj=1_000_000), Clock()
    m = meter_on([gpu], clock)
    clock.t += 1.0
    gpu.energy_mj = 10  # driver reloaded
    m.sample()
    assert m.totals.counter_joules == 0.0
    tick([gpu], clock, m, 1.0, 50.0)
    assert m.totals.counter_joules == pytest.approx(50.0)


async def test_without_an_energy_counter_power_readings_are_integrated() -> None:
    gpu, clock = FakeGpu(energy_mj=None, power_w=200.0), Clock()
    m = meter_on([gpu], clock)
    clock.t += 2.0
    gpu.power_w = 300.0
    m.sample()
    assert m.totals.counter_joules == pytest.approx(500.0)  # trapezoid: (200 + 300) / 2 × 2 s


async def test_idle_power_is_measured_at_start_when_not_given() -> None:
    gpu = FakeGpu(energy_mj=0, power_w=123.0)
    m = NvmlMeter([gpu], prefill_weight=1.0, idle_probe_s=0.0)
    await m.start()
    await m.close()
    assert m.idle_power_w == pytest.approx(123.0)


def test_a_meter_needs_a_gpu() -> None:
    with pytest.raises(ValueError, match="at least one GPU"):
        NvmlMeter([], prefill_weight=1.0)

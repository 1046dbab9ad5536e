from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ecobatch.batcher import Batcher
from ecobatch.config import BatchingSettings
from ecobatch.energy import ModelledMeter
from ecobatch.errors import BackendFailed, BackendTimeout, BadRequest, Overloaded, ShuttingDown
from ecobatch.metrics import Metrics
from ecobatch.openai_api import parse_completion
from ecobatch.profile import EnergyProfile
from tests.fakes import FakeBackend
from tests.integration.helpers import metric


def make(
    backend: FakeBackend, profile: EnergyProfile, timeout_s: float = 30.0, **batching: object
) -> Batcher:
    settings = BatchingSettings(**{"window_min_ms": 1.0, "window_max_ms": 5.0, **batching})  # type: ignore[arg-type]
    metrics = Metrics(
        CollectorRegistry(), model=backend.model, carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD"
    )
    return Batcher(
        backend, ModelledMeter(profile, 1.0), metrics, profile, settings, request_timeout_s=timeout_s
    )


def req(prompt: str = "a b c"):  # type: ignore[no-untyped-def]
    return parse_completion({"prompt": prompt}, "fake-model")


async def run_all(batcher: Batcher, prompts: list[str]) -> list[object]:
    await batcher.start()
    try:
        pendings = [batcher.submit(req(p)) for p in prompts]
        return await asyncio.gather(*(p.future for p in pendings), return_exceptions=True)
    finally:
        await batcher.close(grace_s=1.0)


async def test_every_future_is_resolved_when_the_backend_raises(reference_profile: EnergyProfile) -> None:
    backend = FakeBackend(raise_exc=RuntimeError("GPU fell off the bus"))
    results = await run_all(make(backend, reference_profile), ["x"] * 10)
    assert all(isinstance(r, BackendFailed) for r in results)
    assert "GPU fell off the bus" in str(results[0])


async def test_one_bad_request_fails_alone(reference_profile: EnergyProfile) -> None:
    backend = FakeBackend(fail_prompt="poison")
    results = await run_all(make(backend, reference_profile), ["fine", "poison", "fine too"])
    assert isinstance(results[1], BadRequest)
    assert [type(r).__name__ for r in (results[0], results[2])] == ["Outcome", "Outcome"]


async def test_served_requests_get_energy_that_adds_up_to_the_batch(reference_profile: EnergyProfile) -> None:
    backend = FakeBackend()
    results = await run_all(
        make(backend, reference_profile, window_min_ms=50.0, window_max_ms=50.0), ["a"] * 4
    )
    total = sum(r.energy_joules for r in results)  # type: ignore[attr-defined]
    assert total > 0
    assert all(r.energy_source == "model" for r in results)  # type: ignore[attr-defined]


async def test_a_request_cancelled_in_the_queue_never_reaches_the_backend(
    reference_profile: EnergyProfile,
) -> None:
    gate = asyncio.Event()
    backend = FakeBackend(gate=gate)
    batcher = make(backend, reference_profile)
    await batcher.start()
    first = batcher.submit(req("first"))
    while not backend.batches:  # the static engine is now busy with "first"
        await asyncio.sleep(0.001)
    leaving = batcher.submit(req("leaving"))
    staying = batcher.submit(req("staying"))
    leaving.future.cancel()
    gate.set()
    await asyncio.gather(first.future, staying.future)
    await batcher.close(grace_s=1.0)
    assert ["leaving"] not in backend.batches
    assert all("leaving" not in b for b in backend.batches)


async def test_a_full_queue_answers_overloaded_with_retry_after(reference_profile: EnergyProfile) -> None:
    gate = asyncio.Event()
    batcher = make(FakeBackend(gate=gate), reference_profile, max_queue=2)
    await batcher.start()
    running = batcher.submit(req())
    while batcher.queue_depth:
        await asyncio.sleep(0.001)
    queued = [batcher.submit(req()), batcher.submit(req())]
    with pytest.raises(Overloaded) as info:
        batcher.submit(req())
    assert info.value.retry_after_s >= 1
    assert "batching.max_queue=2" in info.value.message
    gate.set()
    await asyncio.gather(running.future, *(q.future for q in queued))
    await batcher.close(grace_s=1.0)


async def test_a_static_engine_runs_one_batch_at_a_time(reference_profile: EnergyProfile) -> None:
    backend = FakeBackend(delay_s=0.01)
    await run_all(make(backend, reference_profile, max_batch_size=4, energy_tolerance=0.0), ["p"] * 30)
    assert backend.max_inflight <= 4
    assert sum(len(b) for b in backend.batches) == 30


async def test_a_continuous_engine_gets_at_most_the_chosen_batch_size_in_flight(
    reference_profile: EnergyProfile,
) -> None:
    backend = FakeBackend(continuous=True, delay_s=0.01)
    batcher = make(backend, reference_profile, max_batch_size=6, energy_tolerance=0.0)
    await run_all(batcher, ["p"] * 40)
    assert batcher.last_decision is not None and batcher.last_decision.batch_size == 6
    assert backend.max_inflight == 6


async def test_a_backend_that_hangs_times_out_every_request(reference_profile: EnergyProfile) -> None:
    backend = FakeBackend(gate=asyncio.Event())  # never opens
    results = await run_all(make(backend, reference_profile, timeout_s=0.05), ["a", "b"])
    assert all(isinstance(r, BackendTimeout) for r in results)


async def test_closing_fails_what_is_still_queued(reference_profile: EnergyProfile) -> None:
    gate = asyncio.Event()
    batcher = make(FakeBackend(gate=gate), reference_profile)
    await batcher.start()
    running = batcher.submit(req())
    while batcher.queue_depth:
        await asyncio.sleep(0.001)
    queued = batcher.submit(req())
    await batcher.close(grace_s=0.0)
    with pytest.raises(ShuttingDown):
        await queued.future
    assert running.future.done()
    with pytest.raises(ShuttingDown):
        batcher.submit(req())


async def test_reconfiguring_changes_the_next_decision(reference_profile: EnergyProfile) -> None:
    batcher = make(FakeBackend(), reference_profile, max_batch_size=64)
    assert batcher.decide().batch_size > 8
    batcher.reconfigure(BatchingSettings(max_batch_size=8, energy_tolerance=0.0))
    assert batcher.decide().batch_size == 8


async def test_a_request_whose_client_left_mid_batch_is_charged_but_not_counted_as_served(
    reference_profile: EnergyProfile,
) -> None:
    gate = asyncio.Event()
    backend = FakeBackend(gate=gate)
    batcher = make(backend, reference_profile, window_min_ms=20.0, window_max_ms=20.0)
    await batcher.start()
    stays, leaves = batcher.submit(req("a b")), batcher.submit(req("c d"))
    while not backend.batches:
        await asyncio.sleep(0.001)
    leaves.future.cancel()  # the client went away while its batch was on the GPU
    gate.set()
    outcome = await stays.future
    await batcher.close(grace_s=1.0)
    text = generate_latest(batcher._metrics.registry).decode()
    assert metric(text, "ecobatch_request_energy_joules_count") == 1
    # both requests shared the batch evenly (same tokens): the one that left was charged too
    assert metric(text, "ecobatch_energy_joules_total") == pytest.approx(2 * outcome.energy_joules)

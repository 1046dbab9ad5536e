"""The static batcher on a fake clock: the window, one batch at a time, groups that fit the engine,
and every future resolved on every path."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import generate_latest

from ecobatch.clock import FakeClock
from ecobatch.errors import BackendFailed, BackendTimeout, BadRequest, Overloaded, ShuttingDown
from ecobatch.profile import EnergyProfile
from tests.fakes import FakeStaticEngine, answer, req
from tests.integration.helpers import metric
from tests.unit.dispatch_helpers import StaticBatcher, build, settle, settled_by


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_the_window_holds_arrivals_until_its_deadline_then_runs_them_as_one_batch(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeStaticEngine()
    batcher, _ = build(StaticBatcher, engine, reference_profile, clock)
    await batcher.start()
    first = [batcher.submit(req(f"p{i}")) for i in range(3)]
    await settle()
    await clock.advance(0.05)
    later = batcher.submit(req("p3"))
    await settle()
    assert engine.batches == []
    await clock.advance(0.05)
    await asyncio.gather(*(p.future for p in [*first, later]))
    assert engine.batches == [["p0", "p1", "p2", "p3"]]
    assert (await later.future).queue_wait_s == pytest.approx(0.05)
    await batcher.close(grace_s=0)


async def test_one_batch_runs_at_a_time_and_groups_fit_the_engine(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate = asyncio.Event()
    engine = FakeStaticEngine(gate=gate, max_prompts_per_batch=2)
    batcher, _ = build(StaticBatcher, engine, reference_profile, clock)
    await batcher.start()
    pendings = [batcher.submit(req(f"p{i}")) for i in range(5)]
    await clock.advance(0.1)
    assert engine.batches == [["p0", "p1"]]
    gate.set()
    await clock.advance(0.1)
    await asyncio.gather(*(p.future for p in pendings))
    assert engine.batches == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert engine.max_running == 1
    await batcher.close(grace_s=0)


async def test_every_future_is_resolved_when_the_engine_raises(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeStaticEngine(raise_exc=RuntimeError("GPU fell off the bus"))
    batcher, ledger = build(StaticBatcher, engine, reference_profile, clock)
    await batcher.start()
    pendings = [batcher.submit(req()) for _ in range(10)]
    await clock.advance(0.1)
    results = await asyncio.gather(*(p.future for p in pendings), return_exceptions=True)
    assert all(isinstance(r, BackendFailed) and "GPU fell off the bus" in str(r) for r in results)
    assert ledger.inflight_sequences == 0, "no span is left open by a failed batch"
    await batcher.close(grace_s=0)


async def test_one_bad_request_fails_alone(reference_profile: EnergyProfile, clock: FakeClock) -> None:
    batcher, _ = build(StaticBatcher, FakeStaticEngine(), reference_profile, clock)
    await batcher.start()
    fine, poison = batcher.submit(req("fine")), batcher.submit(req("poison"))
    await clock.advance(0.1)
    assert (await fine.future).result.texts == ("ok",)
    with pytest.raises(BadRequest):
        await poison.future
    await batcher.close(grace_s=0)


async def test_a_batch_that_hangs_times_out_every_request_in_it(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeStaticEngine(gate=asyncio.Event())  # never opens
    batcher, _ = build(StaticBatcher, engine, reference_profile, clock, timeout_s=0.05)
    await batcher.start()
    pendings = [batcher.submit(req(p)) for p in "ab"]
    await clock.advance(0.1)
    results = await asyncio.gather(*(p.future for p in pendings), return_exceptions=True)
    assert all(isinstance(r, BackendTimeout) for r in results)
    assert engine.cancelled_batches == 1, "the engine's batch was stopped, not left running"
    await batcher.close(grace_s=0)


async def test_a_request_cancelled_in_the_queue_never_reaches_the_engine(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeStaticEngine()
    batcher, _ = build(StaticBatcher, engine, reference_profile, clock)
    await batcher.start()
    leaving, staying = batcher.submit(req("leaving")), batcher.submit(req("staying"))
    batcher.withdraw(leaving)  # what the handler does when its client disconnects
    await clock.advance(0.1)
    await staying.future
    assert engine.batches == [["staying"]]
    await batcher.close(grace_s=0)


async def test_a_request_whose_client_left_mid_batch_is_charged_but_not_counted_as_served(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate = asyncio.Event()
    engine = FakeStaticEngine(gate=gate)
    batcher, ledger = build(StaticBatcher, engine, reference_profile, clock)
    settled = settled_by(batcher)
    await batcher.start()
    stays, leaves = batcher.submit(req("a b")), batcher.submit(req("c d"))
    await clock.advance(0.1)
    batcher.withdraw(leaves)
    gate.set()
    await stays.future
    await clock.advance(0.1)
    ledger.add_interval(0.0, clock.now(), 10.0)
    assert sorted((s.request_id == stays.request.id, s.delivered) for s in settled) == [
        (False, False),
        (True, True),
    ]
    assert sum(s.joules for s in settled) == pytest.approx(10.0)
    await batcher.close(grace_s=0)


async def test_a_full_queue_answers_overloaded_with_retry_after(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate = asyncio.Event()
    batcher, _ = build(StaticBatcher, FakeStaticEngine(gate=gate), reference_profile, clock, max_queue=2)
    await batcher.start()
    running = batcher.submit(req())
    await clock.advance(0.1)
    queued = [batcher.submit(req()), batcher.submit(req())]
    with pytest.raises(Overloaded) as info:
        batcher.submit(req())
    assert info.value.retry_after_s >= 1 and "batching.max_queue=2" in info.value.message
    gate.set()
    await clock.advance(0.1)
    await asyncio.gather(running.future, *(q.future for q in queued))
    await batcher.close(grace_s=0)


async def test_closing_fails_what_is_still_queued(reference_profile: EnergyProfile, clock: FakeClock) -> None:
    gate = asyncio.Event()
    batcher, _ = build(StaticBatcher, FakeStaticEngine(gate=gate), reference_profile, clock)
    await batcher.start()
    running = batcher.submit(req())
    await clock.advance(0.1)
    queued = batcher.submit(req())
    await batcher.close(grace_s=0.0)
    for pending in (running, queued):
        with pytest.raises(ShuttingDown):
            await pending.future
    with pytest.raises(ShuttingDown):
        batcher.submit(req())


async def test_reconfiguring_changes_the_next_decision(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    from ecobatch.config import BatchingSettings

    batcher, _ = build(StaticBatcher, FakeStaticEngine(), reference_profile, clock, max_batch_sequences=64)
    assert batcher.decide().batch_size > 8
    batcher.reconfigure(BatchingSettings(max_batch_sequences=8, energy_tolerance=0.0))
    assert batcher.decide().batch_size == 8
    text = generate_latest(batcher._metrics.registry).decode()
    assert metric(text, "ecobatch_policy_batch_size") == 8


async def test_retry_after_follows_the_measured_drain_rate(
    reference_profile: EnergyProfile, clock: FakeClock
) -> None:
    """Batches of 4 finish every 0.5 s (8 requests/s): 24 queued requests drain in about 3 s."""
    gate = asyncio.Event()
    engine = FakeStaticEngine(gate=gate)
    batcher, _ = build(
        StaticBatcher,
        engine,
        reference_profile,
        clock,
        max_batch_sequences=4,
        energy_tolerance=0.0,
        max_queue=24,
    )
    await batcher.start()
    first = [batcher.submit(req(f"w{i}")) for i in range(8)]
    for _ in range(2):  # two batches of 4, half a second apart
        await clock.advance(0.1)
        gate.set()
        await settle()
        gate.clear()
        await clock.advance(0.4)
    assert all(p.future.done() for p in first)
    held = batcher.submit(req("held"))  # keeps the engine busy
    await clock.advance(0.1)
    queued = [batcher.submit(req(f"q{i}")) for i in range(24)]
    with pytest.raises(Overloaded) as info:
        batcher.submit(req("one too many"))
    assert 2.0 <= info.value.retry_after_s <= 4.0, info.value.retry_after_s
    gate.set()
    await clock.advance(0.1)
    for _ in range(10):
        await clock.advance(0.1)
    await asyncio.gather(held.future, *(q.future for q in queued))
    await batcher.close(grace_s=0)


class SwallowsCancellation(FakeStaticEngine):
    """Like hf-bnb waiting for its GPU worker: a cancelled batch keeps running until ``released``."""

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()

    async def run_batch(self, jobs: Any) -> Any:
        self.batches.append([p for job in jobs for p in job.request.prompts])
        while not self.released.is_set():
            try:
                await self.released.wait()
            except asyncio.CancelledError:
                self.cancelled_batches += 1
        return [answer(job.request) for job in jobs]


async def test_closing_answers_the_requests_of_an_engine_that_does_not_stop(
    reference_profile: EnergyProfile,
) -> None:
    """A stuck engine cannot hold shutdown: after the grace and STOP_WAIT_S its requests get 503."""
    from ecobatch.clock import MonotonicClock
    from ecobatch.serving.dispatcher import STOP_WAIT_S

    engine = SwallowsCancellation()
    batcher, _ = build(
        StaticBatcher, engine, reference_profile, MonotonicClock(), window_min_ms=0.0, window_max_ms=0.0
    )
    await batcher.start()
    running = batcher.submit(req())
    await asyncio.sleep(0.05)
    assert engine.batches, "the batch reached the engine"
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(batcher.close(grace_s=0.2), timeout=0.2 + STOP_WAIT_S + 1.0)
    assert asyncio.get_running_loop().time() - started < 0.2 + STOP_WAIT_S + 0.5
    try:
        with pytest.raises(ShuttingDown, match="did not stop in time") as info:
            await running.future
        assert info.value.retry_after_s > 0 and engine.cancelled_batches >= 1
    finally:
        engine.released.set()  # the worker finishes at last; its late result must not be delivered
        await asyncio.sleep(0.05)

"""The continuous gate on a fake clock: release at once while busy, hold while idle, never more than
the cap in flight, each slot freed by its own request, cancellation reaching the engine."""

from __future__ import annotations

import asyncio

import pytest

from ecobatch.clock import FakeClock
from ecobatch.errors import BackendTimeout, BadRequest, ShuttingDown
from ecobatch.profile import EnergyProfile
from tests.fakes import FakeContinuousEngine, req
from tests.unit.dispatch_helpers import ContinuousGate, build, settle


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_while_the_engine_is_idle_arrivals_are_held_and_released_together(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock)
    await gate.start()
    pendings = [gate.submit(req(p)) for p in ("a", "b", "c")]
    await settle()
    assert engine.started == [], "an idle engine holds the window"
    await clock.advance(0.05)
    assert engine.started == []
    await clock.advance(0.05)  # the 100 ms window closes
    await asyncio.gather(*(p.future for p in pendings))
    assert engine.started == ["a", "b", "c"]
    assert {(await p.future).group_size for p in pendings} == {3}
    await gate.close(grace_s=0)


async def test_while_the_engine_is_busy_a_new_request_is_released_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock)
    await gate.start()
    first = gate.submit(req("long"))
    await clock.advance(0.1)
    assert engine.started == ["long"]
    joined = gate.submit(req("joins"))
    await settle()  # no time passes
    assert engine.started == ["long", "joins"]
    engine.finish("joins")
    outcome = await joined.future
    assert outcome.queue_wait_s == 0.0
    assert not first.future.done(), "a short request does not wait for its long neighbour"
    engine.finish("long")
    await first.future
    await gate.close(grace_s=0)


async def test_at_most_the_cap_is_in_flight_and_each_slot_frees_when_its_own_request_ends(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, ledger = build(
        ContinuousGate, engine, continuous_profile, clock, max_batch_size=4, energy_tolerance=0.0
    )
    await gate.start()
    names = [f"r{i}" for i in range(16)]  # a burst of 4× the cap
    pendings = {n: gate.submit(req(n)) for n in names}
    await clock.advance(0.1)
    assert gate.last_decision is not None and gate.last_decision.batch_size == 4
    assert engine.started == names[:4]
    engine.finish("r2")
    await pendings["r2"].future
    await settle()
    assert engine.started == [*names[:4], "r4"], "the freed slot goes to the next request at once"
    for n in names:
        engine.finish(n)
    await asyncio.gather(*(p.future for p in pendings.values()))
    assert engine.max_running == 4
    assert gate.inflight == 0 and ledger.inflight_sequences == 0
    await gate.close(grace_s=0)


async def test_a_client_that_leaves_is_aborted_in_the_engine_and_frees_its_slot(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock, max_batch_size=1)
    await gate.start()
    leaving, waiting = gate.submit(req("leaving")), gate.submit(req("waiting"))
    await clock.advance(0.1)
    assert engine.started == ["leaving"]
    gate.withdraw(leaving)  # what the handler does when its client disconnects
    await settle()
    assert engine.aborted == ["leaving"]
    assert engine.started == ["leaving", "waiting"]
    engine.finish("waiting")
    await waiting.future
    assert ledger.inflight_sequences == 0
    await gate.close(grace_s=0)


async def test_a_request_cancelled_in_the_queue_never_reaches_the_engine(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock)
    await gate.start()
    leaving, staying = gate.submit(req("leaving")), gate.submit(req("staying"))
    leaving.future.cancel()  # cancelled without withdraw: still skipped when it reaches the head
    await clock.advance(0.1)
    await staying.future
    assert engine.started == ["staying"]
    await gate.close(grace_s=0)


async def test_one_failing_request_fails_alone(continuous_profile: EnergyProfile, clock: FakeClock) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock)
    await gate.start()
    good, bad = gate.submit(req("fine")), gate.submit(req("poison"))
    await clock.advance(0.1)
    assert (await good.future).result.usage.completion_tokens > 0
    with pytest.raises(BadRequest):
        await bad.future
    assert ledger.inflight_sequences == 0, "the failed request's span was closed"
    await gate.close(grace_s=0)


async def test_a_request_that_hangs_times_out_alone(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock, timeout_s=0.05)
    await gate.start()
    hung, quick = gate.submit(req("hung")), gate.submit(req("quick"))
    await clock.advance(0.1)
    engine.finish("quick")
    assert (await quick.future).result.body is not None
    with pytest.raises(BackendTimeout, match=r"request_timeout_s=0\.05"):
        await hung.future
    assert engine.aborted == ["hung"]
    await gate.close(grace_s=0)


async def test_closing_finishes_in_flight_work_within_the_grace_then_fails_the_rest(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock, max_batch_size=1)
    await gate.start()
    finishing, stuck, queued = (gate.submit(req(p)) for p in ("finishing", "stuck", "queued"))
    await clock.advance(0.1)
    closing = asyncio.create_task(gate.close(grace_s=5.0))
    await settle()
    with pytest.raises(ShuttingDown):
        gate.submit(req("late"))
    engine.finish("finishing")
    await finishing.future
    await settle()
    assert engine.started == ["finishing", "stuck"]
    await clock.advance(5.0)
    await closing
    for pending in (stuck, queued):
        with pytest.raises(ShuttingDown):
            await pending.future
    assert engine.aborted == ["stuck"]
    assert ledger.inflight_sequences == 0


async def test_a_request_of_several_sequences_waits_until_they_fit_under_the_cap(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock, max_batch_size=4, energy_tolerance=0.0)
    await gate.start()
    first = gate.submit(req("first"))
    await clock.advance(0.1)
    wide = gate.submit(req(["wide", "b", "c", "d"]))  # type: ignore[arg-type]
    await settle()
    assert engine.started == ["first"], "4 sequences do not fit beside 1 under a cap of 4"
    engine.finish("first")
    await first.future
    await settle()
    assert engine.started == ["first", "wide"]
    engine.finish("wide")
    await wide.future
    assert engine.max_running == 4
    await gate.close(grace_s=0)


async def test_raising_the_cap_at_run_time_releases_waiting_requests_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    from ecobatch.config import BatchingSettings

    engine = FakeContinuousEngine()
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock, max_batch_size=2, energy_tolerance=0.0)
    await gate.start()
    pendings = [gate.submit(req(f"r{i}")) for i in range(5)]
    await clock.advance(0.1)
    assert engine.started == ["r0", "r1"]
    gate.reconfigure(BatchingSettings(max_batch_size=8, energy_tolerance=0.0, window_max_ms=100.0))
    await settle()
    assert engine.started == [f"r{i}" for i in range(5)]
    for i in range(5):
        engine.finish(f"r{i}")
    await asyncio.gather(*(p.future for p in pendings))
    await gate.close(grace_s=0)


async def test_closing_while_a_window_is_open_fails_what_it_held(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock)
    await gate.start()
    held = [gate.submit(req(p)) for p in "ab"]
    await settle()
    await gate.close(grace_s=0)
    for pending in held:
        with pytest.raises(ShuttingDown):
            await pending.future
    assert engine.started == []


async def test_a_request_cancelled_before_its_task_ran_still_frees_its_slot(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """The race where shutdown (or a client leaving) cancels a released request before its first step."""
    from ecobatch.admission import Pending

    engine = FakeContinuousEngine(instant=True)
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock)
    pending = Pending(req("x"), asyncio.get_running_loop().create_future(), clock.now(), None)
    replica = gate.replicas[0]
    replica.inflight += 1  # as the gate's routing reserves it
    gate._release([(pending, replica)])
    assert gate.inflight == 1
    for task in list(gate._tasks):
        task.cancel()  # before it ever ran
    await settle()
    assert gate.inflight == 0 and replica.inflight == 0 and engine.started == []
    assert not gate._running, "no entry left for a request that never ran"
    with pytest.raises(ShuttingDown):
        await pending.future
    assert ledger.inflight_sequences == 0


async def test_a_request_that_ends_without_the_engines_count_still_carries_its_share_of_the_joules(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """A non-streaming request whose client left after 1 s beside one that ran on: the leaver is charged
    for its prompt and the tokens the profile says it decoded, not 0 J with its neighbour paying all."""
    engine = FakeContinuousEngine()
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock, window_min_ms=0, window_max_ms=0)
    settled: dict[str, float] = {}
    ledger.on_request = lambda s: settled.__setitem__(s.request_id, s.joules)
    await gate.start()
    leaving, staying = gate.submit(req("leaving")), gate.submit(req("staying"))
    await settle()
    assert engine.started == ["leaving", "staying"]
    await clock.advance(1.0)
    gate.withdraw(leaving)
    await settle()
    engine.finish("staying")
    await staying.future
    ledger.add_interval(0.0, 1.0, 400.0)  # both ran for this whole second
    ledger.flush()
    ids = {p.request.id: name for p, name in ((leaving, "leaving"), (staying, "staying"))}
    joules = {ids[k]: v for k, v in settled.items()}
    assert joules["leaving"] > 0.25 * 400.0, joules  # its decode over the second, estimated
    assert joules["leaving"] + joules["staying"] == pytest.approx(400.0)
    await gate.close(grace_s=0)

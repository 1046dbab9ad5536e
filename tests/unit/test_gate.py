"""The continuous gate on a fake clock, driven by the run-time controller: interactive requests join a busy
engine at once and are held on an idle one only while holding pays, within their budget; priority is
never held; flex gathers and goes together; the in-flight limit is a safety limit under which each slot
frees with its own request; cancellation reaches the engine; every future is resolved."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from ecobatch.clock import FakeClock
from ecobatch.config import BatchingSettings
from ecobatch.domain import EngineOutput, Headroom
from ecobatch.errors import BackendTimeout, BadRequest, ShuttingDown
from ecobatch.profile import EnergyProfile
from ecobatch.serving.admission import Pending
from tests.fakes import CountingEngine, FakeContinuousEngine, req
from tests.unit.dispatch_helpers import ContinuousGate, build, build_gate, settle, settled_by

LONG = 512  # max_tokens of a long request: ~2.4 s alone on the H200 reference curve


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def warm(
    gate: ContinuousGate, clock: FakeClock, engine: FakeContinuousEngine, rate: float = 40.0
) -> None:
    """A second of long requests at ``rate`` (an instant engine serves them): the controller's sliding
    window (1 s in these tests) then reads ``rate``."""
    for i in range(int(rate)):
        gate.submit(req(f"warm{i}", max_tokens=LONG))
        await clock.advance(1.0 / rate)
    await clock.advance(0.2)  # the last ones go
    engine.started.clear()


def sample(metrics: object, name: str, **labels: str) -> float | None:
    """One series of the gate's metrics now (None: no such series)."""
    value = metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return None if value is None else float(value)


def released(metrics: object, tier: str, reason: str) -> float:
    labels = {"model": "fake-model", "tier": tier, "reason": reason}
    return sample(metrics, "ecobatch_release_decisions_total", **labels) or 0.0


async def read_all(pending: Pending) -> list[EngineOutput]:
    """What the stream's handler reads, to its end."""
    assert pending.outputs is not None
    return [output async for output in pending.outputs]


def interactive_misses(metrics: object) -> float | None:
    return sample(metrics, "ecobatch_budget_misses_total", model="fake-model", tier="interactive")


# ---- interactive ---------------------------------------------------------------------------------
async def test_on_an_idle_engine_under_steady_load_arrivals_are_held_to_their_budget_and_go_together(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """40 requests a second: four more are expected within 100 ms, so holding pays; they go together at
    the 100 ms budget (the default interactive window)."""
    engine = FakeContinuousEngine(instant=True)
    gate, _, metrics = build_gate([engine], continuous_profile, clock, load_window_s=1.0)
    await gate.start()
    await warm(gate, clock, engine)
    before = released(metrics, "interactive", "budget")
    pendings = [gate.submit(req(p, max_tokens=LONG)) for p in ("a", "b", "c")]
    await settle()
    assert engine.started == [], "an idle engine holds a burst"
    await clock.advance(0.089)
    assert engine.started == []
    await clock.advance(0.002)  # the budget less a timer's lateness (release.RELEASE_MARGIN_S)
    await asyncio.gather(*(p.future for p in pendings))
    assert engine.started == ["a", "b", "c"]
    assert {(await p.future).group_size for p in pendings} == {3}
    assert released(metrics, "interactive", "budget") - before == 3
    await gate.close(grace_s=0)


async def test_a_short_request_is_held_no_longer_than_its_own_service_time(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """Length-aware: two requests of 16 tokens take ~47 ms together on the reference curve, so they are
    held that long, not the full 100 ms budget."""
    service_s = 16 / (continuous_profile.at(2).tokens_per_s / 2)
    assert 0.04 < service_s < 0.05
    engine = FakeContinuousEngine(instant=True)
    gate, _, _ = build_gate([engine], continuous_profile, clock, load_window_s=1.0)
    await gate.start()
    await warm(gate, clock, engine)
    pendings = [gate.submit(req(p, max_tokens=16)) for p in ("a", "b")]
    await settle()
    await clock.advance(service_s - 0.001)
    assert engine.started == []
    await clock.advance(0.002)
    await asyncio.gather(*(p.future for p in pendings))
    assert engine.started == ["a", "b"]
    await gate.close(grace_s=0)


async def test_a_lone_request_after_a_quiet_spell_goes_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """Nothing else is expected before its budget ends: holding could save nothing."""
    engine = FakeContinuousEngine(instant=True)
    gate, _, metrics = build_gate([engine], continuous_profile, clock)
    await gate.start()
    await clock.advance(60.0)
    lone = gate.submit(req("lone", max_tokens=LONG))
    await settle()
    assert engine.started == ["lone"]
    assert (await lone.future).queue_wait_s == 0.0
    assert released(metrics, "interactive", "no_saving") == 1
    await gate.close(grace_s=0)


async def test_while_the_engine_is_busy_a_new_request_joins_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _, metrics = build_gate([engine], continuous_profile, clock)
    await gate.start()
    first = gate.submit(req("long", max_tokens=LONG))
    await clock.advance(0.1)
    assert engine.started == ["long"]
    joined = gate.submit(req("joins"))
    await settle()  # no time passes
    assert engine.started == ["long", "joins"]
    engine.finish("joins")
    outcome = await joined.future
    assert outcome.queue_wait_s == 0.0
    assert not first.future.done(), "a short request does not wait for its long neighbour"
    assert released(metrics, "interactive", "busy") == 1
    engine.finish("long")
    await first.future
    await gate.close(grace_s=0)


async def test_another_clients_work_on_the_engine_counts_as_busy(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """Under a load that would hold arrivals on an idle engine (as the first test shows), another
    client's work running on it makes it busy: ours join at once."""
    engine = FakeContinuousEngine(instant=True)
    gate, _, metrics = build_gate([engine], continuous_profile, clock, load_window_s=1.0)
    await gate.start()
    await warm(gate, clock, engine)
    engine.headroom_value = Headroom(running=3, waiting=0)  # vLLM's /metrics: 3 running, none ours
    before = released(metrics, "interactive", "busy")
    pendings = [gate.submit(req(p, max_tokens=LONG)) for p in ("a", "b")]
    await settle()
    assert engine.started == ["a", "b"], "joining another client's running batch is nearly free too"
    assert released(metrics, "interactive", "busy") == before + 2
    await asyncio.gather(*(p.future for p in pendings))
    await gate.close(grace_s=0)


async def test_a_first_token_later_than_the_budget_is_a_budget_miss(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """Budgets are to the first token: a stream released at once whose first token comes 0.3 s after
    its arrival missed its 100 ms budget; one whose first token comes in time did not."""
    engine = FakeContinuousEngine()
    gate, _, metrics = build_gate([engine], continuous_profile, clock)
    await gate.start()
    late = gate.submit(req("late", max_tokens=LONG, stream=True))
    reading = asyncio.create_task(read_all(late))
    await settle()
    assert engine.started == ["late"]
    await clock.advance(0.3)
    engine.finish("late")
    await late.future
    on_time = gate.submit(req("on-time", max_tokens=LONG, stream=True))
    reading_on_time = asyncio.create_task(read_all(on_time))
    await settle()
    engine.finish("on-time")
    await on_time.future
    assert [d.text for o in await reading for d in o.deltas] == ["ok"]
    assert [d.text for o in await reading_on_time for d in o.deltas] == ["ok"]
    assert interactive_misses(metrics) == 1
    await gate.close(grace_s=0)


# ---- priority ------------------------------------------------------------------------------------
async def test_priority_requests_are_never_held(continuous_profile: EnergyProfile, clock: FakeClock) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _, metrics = build_gate([engine], continuous_profile, clock, load_window_s=1.0)
    await gate.start()
    await warm(gate, clock, engine)
    held = [gate.submit(req(p, max_tokens=LONG)) for p in ("i1", "i2")]
    await settle()
    assert engine.started == []
    urgent = gate.submit(req("p", max_tokens=LONG, service_tier="priority"))
    await settle()
    assert engine.started[0] == "p", "priority goes at once, ahead of the held interactive ones"
    assert (await urgent.future).queue_wait_s == 0.0 and (await urgent.future).tier == "priority"
    await asyncio.gather(*(p.future for p in held))
    assert released(metrics, "priority", "priority") == 1
    await gate.close(grace_s=0)


# ---- flex ----------------------------------------------------------------------------------------
async def test_flex_requests_gather_even_while_the_engine_is_busy_and_go_together_at_the_budget(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _, metrics = build_gate([engine], continuous_profile, clock, flex_budget_ms=2000)
    await gate.start()
    gate.submit(req("busy", max_tokens=16, service_tier="priority"))
    await settle()
    flex = [gate.submit(req(f"f{i}", max_tokens=LONG, service_tier="flex")) for i in range(3)]
    await clock.advance(0.5)
    flex.append(gate.submit(req("f3", max_tokens=LONG, service_tier="flex")))
    await clock.advance(1.4)
    assert engine.started == ["busy"], "flex does not trickle into a running batch it would stretch"
    await clock.advance(0.1)  # the oldest's 2 s budget (less a timer's lateness)
    assert engine.started == ["busy", "f0", "f1", "f2", "f3"], "the whole group goes together"
    assert released(metrics, "flex", "budget") == 4
    for name in ("busy", "f0", "f1", "f2", "f3"):
        engine.finish(name)
    outcomes = await asyncio.gather(*(p.future for p in flex))
    assert [o.tier for o in outcomes] == ["flex"] * 4
    assert [round(o.queue_wait_s, 3) for o in outcomes] == [2.0, 2.0, 2.0, 1.5]  # the clock moved in 0.1 s
    await gate.close(grace_s=0)


async def test_a_flex_line_that_fills_half_the_queue_goes_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """Interactive requests keep room in the queue: flex gathers in at most half of it."""
    engine = FakeContinuousEngine(instant=True)
    gate, _, metrics = build_gate([engine], continuous_profile, clock, max_queue=8)
    await gate.start()
    group = [gate.submit(req(f"f{i}", max_tokens=LONG, service_tier="flex")) for i in range(3)]
    await clock.advance(1.0)
    assert engine.started == []
    group.append(gate.submit(req("f3", max_tokens=LONG, service_tier="flex")))
    await asyncio.gather(*(p.future for p in group))
    assert engine.started == ["f0", "f1", "f2", "f3"]
    assert released(metrics, "flex", "queue_full") == 4
    await gate.close(grace_s=0)


async def test_a_flex_request_that_ends_before_the_running_batch_joins_it_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """It adds no busy time: the GPU runs until the long request ends either way."""
    engine = FakeContinuousEngine()
    gate, _, metrics = build_gate([engine], continuous_profile, clock)
    await gate.start()
    long = gate.submit(req("long", max_tokens=LONG, service_tier="priority"))
    await settle()
    short = gate.submit(req("short", max_tokens=16, service_tier="flex"))
    stretching = gate.submit(req("stretching", max_tokens=4 * LONG, service_tier="flex"))
    await settle()
    assert engine.started == ["long", "short"], "the short one fits inside; the longer one would stretch it"
    assert released(metrics, "flex", "fits_busy") == 1
    for name in ("long", "short"):
        engine.finish(name)
    await asyncio.gather(long.future, short.future)
    assert not stretching.future.done()
    await gate.close(grace_s=0)


# ---- the safety limit ----------------------------------------------------------------------------
async def test_at_most_the_limit_is_in_flight_and_each_slot_frees_when_its_own_request_ends(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, ledgers, metrics = build_gate([engine], continuous_profile, clock, max_inflight_sequences=4)
    _, _, unlimited_metrics = build_gate([FakeContinuousEngine()], continuous_profile, clock)
    assert sample(unlimited_metrics, "ecobatch_inflight_limit_sequences", replica="r0") == math.inf  # none
    await gate.start()
    names = [f"r{i}" for i in range(16)]  # a burst of 4x the limit
    pendings = {n: gate.submit(req(n, max_tokens=LONG)) for n in names}
    await clock.advance(0.1)
    assert engine.started == names[:4]
    assert sample(metrics, "ecobatch_inflight_limit_sequences", replica="r0") == 4
    engine.finish("r2")
    await pendings["r2"].future
    await settle()
    assert engine.started == [*names[:4], "r4"], "the freed slot goes to the next request at once"
    for n in names:
        engine.finish(n)
    await asyncio.gather(*(p.future for p in pendings.values()))
    assert engine.max_running == 4
    assert gate.inflight == 0 and ledgers[0].inflight_sequences == 0
    await gate.close(grace_s=0)


async def test_a_short_request_that_fits_the_kv_cache_is_not_held_behind_a_long_one_that_does_not(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    engine.headroom_value = Headroom(kv_free_tokens=3000, kv_capacity_tokens=3000, running=0, waiting=0)
    gate, _, _ = build_gate([engine], continuous_profile, clock, interactive_budget_ms=0)
    await gate.start()
    first = gate.submit(req("first", max_tokens=2000))
    await settle()
    assert engine.started == ["first"]
    long = gate.submit(req("long", max_tokens=2000))  # 2,000 more tokens do not fit beside the first
    short = gate.submit(req("short", max_tokens=16))
    await settle()
    assert engine.started == ["first", "short"]
    engine.finish("short")
    await short.future
    engine.finish("first")
    await first.future
    await settle()
    assert engine.started == ["first", "short", "long"]
    engine.finish("long")
    await long.future
    await gate.close(grace_s=0)


async def test_a_request_of_several_sequences_waits_until_they_fit_under_the_limit(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _ = build(
        ContinuousGate, engine, continuous_profile, clock, max_inflight_sequences=4, interactive_budget_ms=0
    )
    await gate.start()
    first = gate.submit(req("first", max_tokens=LONG))
    await clock.advance(0.1)
    wide = gate.submit(req(["wide", "b", "c", "d"], max_tokens=LONG))  # type: ignore[arg-type]
    await settle()
    assert engine.started == ["first"], "4 sequences do not fit beside 1 under a limit of 4"
    engine.finish("first")
    await first.future
    await settle()
    assert engine.started == ["first", "wide"]
    engine.finish("wide")
    await wide.future
    assert engine.max_running == 4
    await gate.close(grace_s=0)


async def test_raising_the_limit_at_run_time_releases_waiting_requests_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock, max_inflight_sequences=2)
    await gate.start()
    pendings = [gate.submit(req(f"r{i}", max_tokens=LONG)) for i in range(5)]
    await clock.advance(0.1)
    assert engine.started == ["r0", "r1"]
    gate.reconfigure(BatchingSettings(max_inflight_sequences=8))
    await settle()
    assert engine.started == [f"r{i}" for i in range(5)]
    for i in range(5):
        engine.finish(f"r{i}")
    await asyncio.gather(*(p.future for p in pendings))
    await gate.close(grace_s=0)


async def test_a_request_that_waited_past_its_budget_is_counted_as_a_miss(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _, metrics = build_gate(
        [engine], continuous_profile, clock, max_inflight_sequences=1, interactive_budget_ms=0
    )
    await gate.start()
    first, second = gate.submit(req("first", max_tokens=LONG)), gate.submit(req("second", max_tokens=LONG))
    await settle()
    assert engine.started == ["first"]
    await clock.advance(0.5)
    engine.finish("first")
    await first.future
    await settle()
    engine.finish("second")
    assert (await second.future).queue_wait_s == pytest.approx(0.5)
    assert interactive_misses(metrics) == 1
    await gate.close(grace_s=0)


# ---- the engine's own priority -------------------------------------------------------------------
async def test_with_engine_priority_each_tier_reaches_vllm_as_its_priority(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _, _ = build_gate([engine], continuous_profile, clock, engine_priority=True, flex_budget_ms=100)
    await gate.start()
    pendings = [
        gate.submit(req(p, max_tokens=16, service_tier=t))
        for p, t in (("p", "priority"), ("i", "default"), ("f", "flex"))
    ]
    await clock.advance(0.1)
    await asyncio.gather(*(p.future for p in pendings))
    assert engine.priorities == {"p": -1, "i": 0, "f": 1}
    await gate.close(grace_s=0)


# ---- every future resolved -----------------------------------------------------------------------
async def test_a_client_that_leaves_is_aborted_in_the_engine_and_frees_its_slot(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock, max_inflight_sequences=1)
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


async def test_a_slow_reader_holds_no_slot_or_energy_span_once_the_engine_is_done(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """The engine runs at its own speed whatever the client reads: its request ends, frees its slot and
    closes its energy span when the engine is done; the client still gets every token once, in order."""
    engine = CountingEngine()
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock)
    await gate.start()
    stream = gate.submit(req("slow-reader", max_tokens=100, stream=True))
    await clock.advance(0.1)
    await settle()
    assert engine.asked == 100, "the engine was pulled to its end while the client read nothing"
    assert stream.future.done(), "the request is resolved"
    assert gate.inflight == 0 and ledger.inflight_sequences == 0, "no slot, no open span"
    outputs = await read_all(stream)
    assert "".join(d.text for o in outputs for d in o.deltas) == "t" * 100
    assert outputs[-1].usage is not None and outputs[-1].usage.completion_tokens == 100
    await gate.close(grace_s=0)


async def test_a_client_that_leaves_mid_stream_aborts_the_engine_request_and_frees_its_slot(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = CountingEngine(hold_after=1)  # one token, then the engine is still at work
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock, max_inflight_sequences=1)
    await gate.start()
    leaving = gate.submit(req("leaving", max_tokens=100, stream=True))
    await clock.advance(0.1)
    assert leaving.outputs is not None
    first = await anext(leaving.outputs)
    assert [d.text for d in first.deltas] == ["t"]
    gate.withdraw(leaving)  # what the handler does when its client disconnects mid-stream
    await settle()
    assert engine.aborted == ["leaving"]
    assert engine.asked < 100
    assert gate.inflight == 0 and ledger.inflight_sequences == 0
    assert leaving.outputs.closed, "the stream ends with its request"
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
    assert (await quick.future).result.texts == ("ok",)
    with pytest.raises(BackendTimeout, match=r"request_timeout_s=0\.05"):
        await hung.future
    assert engine.aborted == ["hung"]
    await gate.close(grace_s=0)


async def test_closing_finishes_in_flight_work_within_the_grace_then_fails_the_rest(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock, max_inflight_sequences=1)
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


async def test_closing_while_requests_are_held_fails_what_it_held(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _ = build(ContinuousGate, engine, continuous_profile, clock, load_window_s=1.0)
    assert isinstance(gate, ContinuousGate)
    await gate.start()
    await warm(gate, clock, engine)
    held = [gate.submit(req(p, max_tokens=LONG)) for p in "ab"]
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
    engine = FakeContinuousEngine(instant=True)
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock)
    assert isinstance(gate, ContinuousGate)
    pending = gate.submit(req("x"))
    replica = gate.replicas[0]
    gate._admission.remove(pending)
    gate._start(pending, replica, clock.now(), 1)
    assert gate.inflight == 1 and replica.inflight == 1
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
    gate, ledger = build(ContinuousGate, engine, continuous_profile, clock, interactive_budget_ms=0)
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
    joules = {ids[s.request_id]: s.joules for s in settled_by(gate)}
    assert joules["leaving"] > 0.25 * 400.0, joules  # its decode over the second, estimated
    assert joules["leaving"] + joules["staying"] == pytest.approx(400.0)
    await gate.close(grace_s=0)


async def test_the_batching_view_says_why_each_request_was_released_or_held(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _, _ = build_gate([engine], continuous_profile, clock, flex_budget_ms=5000)
    await gate.start()
    flex = gate.submit(req("f", max_tokens=LONG, service_tier="flex"))
    urgent = gate.submit(req("p", max_tokens=16, service_tier="priority"))
    await urgent.future
    await settle()
    view = gate.view()
    assert view["engine_shape"] == "continuous"
    assert view["tiers"]["flex"]["waiting"] == 1
    assert [(h["tier"], h["reason"]) for h in view["holds"]] == [("flex", "gathering")]
    assert view["recent_decisions"][-1]["reason"] == "priority"
    assert view["replicas"][0]["limited_by"] == "none"
    assert view["load"]["arrival_rate_per_s"]["flex"] > 0  # the one flex arrival in the window
    await gate.close(grace_s=0)
    with pytest.raises(ShuttingDown):
        await flex.future


async def test_a_round_that_fails_every_time_answers_what_waits_instead_of_leaving_it(
    continuous_profile: EnergyProfile, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that every round meets would leave the queue standing still: after three rounds in a row
    fail at once, the waiting requests are answered with the error."""
    import ecobatch.serving.gate as gate_module
    from ecobatch.errors import EcobatchError

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the plan")

    monkeypatch.setattr(gate_module, "plan_releases", broken)
    engine = FakeContinuousEngine(instant=True)
    gate, _, _ = build_gate([engine], continuous_profile, clock)
    await gate.start()
    pending = gate.submit(req("a", max_tokens=LONG))
    async with asyncio.timeout(5):
        with pytest.raises(EcobatchError, match="dispatch loop fails on every round: RuntimeError"):
            await pending.future
    assert engine.started == []
    await gate.close(grace_s=0)


async def test_the_scale_signal_follows_the_live_load_and_falls_to_zero_when_it_stops(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine(instant=True)
    gate, _, metrics = build_gate([engine], continuous_profile, clock, load_window_s=1.0)
    await gate.start()

    def signal() -> float:
        value = sample(metrics, "ecobatch_replicas_needed", model="fake-model")
        assert value is not None
        return value

    async def stream(rate: float, name: str) -> float:
        """Arrivals at ``rate`` for 2 s; the signal read as the last one arrives."""
        for i in range(int(2 * rate)):
            gate.submit(req(f"{name}{i}", max_tokens=LONG))
            await clock.advance(1.0 / rate)
        return signal()

    assert signal() == 0.0
    at_20 = await stream(20.0, "a")
    await clock.advance(5.0)  # the window empties
    assert signal() == 0.0
    at_40 = await stream(40.0, "b")
    assert at_20 > 0 and at_40 == pytest.approx(2 * at_20, rel=0.1)
    await gate.close(grace_s=0)


async def test_a_round_that_fails_now_and_then_leaves_the_queue_alone(
    continuous_profile: EnergyProfile, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures with good rounds between them are not a loop stuck on a bug: what waits stays queued."""
    import ecobatch.serving.gate as gate_module

    real, calls = gate_module.plan_releases, [0]

    def every_other_fails(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] % 2 == 0:
            raise RuntimeError(f"a bug met now and then (#{calls[0]})")
        return real(*args, **kwargs)

    monkeypatch.setattr(gate_module, "plan_releases", every_other_fails)
    engine = FakeContinuousEngine(instant=True)
    gate, _, _ = build_gate([engine], continuous_profile, clock)
    await gate.start()
    flex = gate.submit(req("flex", max_tokens=LONG, service_tier="flex"))  # gathers for 30 s
    for name in ("i1", "i2", "i3", "i4"):
        done = gate.submit(req(name, max_tokens=16, service_tier="priority"))
        async with asyncio.timeout(5):
            await done.future
    assert calls[0] >= 6, "rounds failed between the good ones"
    assert not flex.future.done(), "a flex request still within its budget was answered with the error"
    await gate.close(grace_s=0)


async def test_a_stream_that_waited_past_its_budget_and_failed_before_any_token_is_a_miss(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    engine = FakeContinuousEngine()
    gate, _, metrics = build_gate([engine], continuous_profile, clock, max_inflight_sequences=1)
    await gate.start()
    busy = gate.submit(req("busy", max_tokens=LONG))
    await settle()
    stream = gate.submit(req("poison-stream", max_tokens=LONG, stream=True))  # no room
    await settle()
    await clock.advance(0.5)  # five times its 100 ms budget
    engine.finish("busy")
    await busy.future
    with pytest.raises(BadRequest):  # the engine fails it before its first token
        await stream.future
    assert interactive_misses(metrics) == 1
    await gate.close(grace_s=0)

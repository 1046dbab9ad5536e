"""The continuous gate over several replicas, on a fake clock: pack fills one replica to its limit before
waking the next, round-robin alternates, a down replica is skipped and taken back when it recovers,
each request's energy goes to its own replica's ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from ecobatch.clock import FakeClock
from ecobatch.domain import EngineOutput
from ecobatch.energy.ledger import Ledger
from ecobatch.errors import UpstreamDown
from ecobatch.profile import EnergyProfile
from ecobatch.serving.gate import RECHECK_S, ContinuousGate
from ecobatch.serving.metrics import Metrics
from ecobatch.serving.routing import RoutingPolicy
from tests.fakes import FakeContinuousEngine, req
from tests.unit.dispatch_helpers import build_gate, settle


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def build(
    profile: EnergyProfile, clock: FakeClock, routing: RoutingPolicy, n: int = 2, **batching: Any
) -> tuple[ContinuousGate, list[FakeContinuousEngine], list[Ledger], Metrics]:
    """Two replicas; no interactive hold (budget 0) unless a test asks for one."""
    engines = [FakeContinuousEngine() for _ in range(n)]
    gate, ledgers, metrics = build_gate(
        engines, profile, clock, routing=routing, **{"interactive_budget_ms": 0, **batching}
    )
    return gate, engines, ledgers, metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_pack_fills_the_first_replica_to_its_cap_before_waking_the_second(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate, (a, b), _, metrics = build(continuous_profile, clock, "pack", max_inflight_sequences=3)
    await gate.start()
    first = [gate.submit(req(f"a{i}")) for i in range(2)]
    await settle()
    assert a.started == ["a0", "a1"] and b.started == []
    third = gate.submit(req("a2"))
    await settle()
    assert a.started == ["a0", "a1", "a2"], "joins the busy replica at once"
    spill = gate.submit(req("b0"))
    await settle()
    assert b.started == ["b0"], "the first is at its limit of 3: the next wakes"
    assert value(metrics, "ecobatch_replica_inflight_sequences", replica="r0") == 3
    assert value(metrics, "ecobatch_replica_requests_total", replica="r1") == 1
    for name in ("a0", "a1", "a2"):
        a.finish(name)
    b.finish("b0")
    await asyncio.gather(*(p.future for p in [*first, third, spill]))
    assert [r.inflight for r in gate.replicas] == [0, 0]
    await gate.close(grace_s=0)


async def test_round_robin_alternates_between_replicas(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate, (a, b), _, _ = build(continuous_profile, clock, "round-robin", max_inflight_sequences=8)
    await gate.start()
    pendings = [gate.submit(req(f"p{i}")) for i in range(4)]
    await clock.advance(0.1)
    assert a.started == ["p0", "p2"] and b.started == ["p1", "p3"]
    for name in ("p0", "p2"):
        a.finish(name)
    for name in ("p1", "p3"):
        b.finish(name)
    await asyncio.gather(*(p.future for p in pendings))
    await gate.close(grace_s=0)


async def test_each_request_is_accounted_on_its_own_replicas_ledger(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate, (a, b), (ledger_a, ledger_b), _ = build(continuous_profile, clock, "round-robin")
    await gate.start()
    on_a, on_b = gate.submit(req("x")), gate.submit(req("y"))
    await clock.advance(0.1)
    assert ledger_a.inflight_sequences == 1 and ledger_b.inflight_sequences == 1
    a.finish("x")
    b.finish("y")
    await asyncio.gather(on_a.future, on_b.future)
    assert ledger_a.inflight_sequences == 0 and ledger_b.inflight_sequences == 0
    await gate.close(grace_s=0)


async def test_a_down_replica_is_skipped_and_taken_back_once_it_is_up(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate, (a, b), _, metrics = build(continuous_profile, clock, "pack", max_inflight_sequences=1)
    a.state = "down"
    await gate.start()
    assert value(metrics, "ecobatch_replica_up", replica="r0") == 0
    first = gate.submit(req("one"))
    await clock.advance(0.1)
    assert a.started == [] and b.started == ["one"]
    second = gate.submit(req("two"))
    await clock.advance(0.1)
    assert a.started == [], "r1 is at its limit of 1 and r0 is down: the request waits"
    a.state = "up"
    await clock.advance(RECHECK_S)  # nothing frees a slot: the gate looks again by itself
    assert a.started == ["two"]
    a.finish("two")
    b.finish("one")
    await asyncio.gather(first.future, second.future)
    await gate.close(grace_s=0)


async def test_when_every_replica_is_down_a_queued_request_is_answered_at_once(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    gate, engines, _, _ = build(continuous_profile, clock, "pack")

    async def down(request: Any) -> AsyncGenerator[EngineOutput, None]:
        raise UpstreamDown("upstream is down", retry_after_s=5.0)
        yield  # an engine's generator that fails before its first output

    for engine in engines:
        engine.state = "down"
        engine.generate = down  # type: ignore[method-assign]
    await gate.start()
    pending = gate.submit(req("x"))
    await clock.advance(0.1)
    with pytest.raises(UpstreamDown):
        await pending.future
    await gate.close(grace_s=0)


async def test_each_replica_has_its_own_kv_room(continuous_profile: EnergyProfile, clock: FakeClock) -> None:
    """r0's KV cache holds 450 tokens: two requests of ~200 fit, the third goes to r1."""
    from ecobatch.domain import Headroom

    gate, (a, b), _, _ = build(continuous_profile, clock, "pack")
    a.headroom_value = Headroom(kv_free_tokens=450, kv_capacity_tokens=450)
    await gate.start()
    pendings = [gate.submit(req(f"p{i}", max_tokens=200)) for i in range(3)]
    await settle()
    assert a.started == ["p0", "p1"] and b.started == ["p2"]
    for p in ("p0", "p1"):
        a.finish(p)
    b.finish("p2")
    await asyncio.gather(*(p.future for p in pendings))
    await gate.close(grace_s=0)


async def test_a_request_whose_replica_refuses_the_connection_runs_on_another(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    """A refused connection never reached an engine: the request goes to a replica that is up, instead
    of failing while the breaker of the dead one opens."""
    from ecobatch.errors import BackendFailed

    gate, (a, b), (ledger_a, ledger_b), metrics = build(continuous_profile, clock, "pack")

    async def refused(request: Any) -> AsyncGenerator[EngineOutput, None]:
        a.state = "down"  # as the breaker trips on a refused connection
        failed = BackendFailed("upstream http://a failed: connection refused")
        failed.connect_failed = True
        raise failed
        yield

    a.generate = refused  # type: ignore[method-assign]
    await gate.start()
    pending = gate.submit(req("x"))
    await clock.advance(0.1)
    assert b.started == ["x"]
    assert [r.inflight for r in gate.replicas] == [0, 1]
    assert ledger_a.inflight_sequences == 0 and ledger_b.inflight_sequences == 1
    assert ledger_a.pending_requests == 0, "r0 never ran it: no record to share r0's joules or file a receipt"
    b.finish("x")
    outcome = await pending.future
    assert outcome.result.usage.completion_tokens > 0, "served by r1"
    await settle()
    assert [r.inflight for r in gate.replicas] == [0, 0] and gate.inflight == 0
    assert value(metrics, "ecobatch_replica_requests_total", replica="r1") == 1
    await gate.close(grace_s=0)
    for replica in gate.replicas:  # their meters' last intervals settle it
        await replica.meter.close()
    receipt = gate.replicas[1].account.receipts.get(pending.request.id)
    assert receipt is not None and receipt["status"] == "settled", "one receipt, settled by r1's account"


async def test_a_failure_after_the_request_reached_the_engine_is_not_sent_again(
    continuous_profile: EnergyProfile, clock: FakeClock
) -> None:
    from ecobatch.errors import BackendFailed

    gate, (a, b), _, _ = build(continuous_profile, clock, "pack")

    async def broken(request: Any) -> AsyncGenerator[EngineOutput, None]:
        raise BackendFailed("upstream returned 500: CUDA error")
        yield

    a.generate = broken  # type: ignore[method-assign]
    await gate.start()
    pending = gate.submit(req("x"))
    await clock.advance(0.1)
    with pytest.raises(BackendFailed):
        await pending.future
    await settle()
    assert b.started == [], "it may have run: never twice"
    assert [r.inflight for r in gate.replicas] == [0, 0]
    await gate.close(grace_s=0)

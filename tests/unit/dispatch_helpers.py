"""Builds a dispatcher of either shape on a fake clock, modelled energy accounts and a fresh registry."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from ecobatch.clock import Clock, FakeClock
from ecobatch.config import BatchingSettings
from ecobatch.energy.account import EnergyAccount
from ecobatch.energy.ledger import Ledger, SettledRequest
from ecobatch.energy.meter import Meter
from ecobatch.energy.receipts import Receipts
from ecobatch.profile import EnergyProfile
from ecobatch.serving.batcher import StaticBatcher
from ecobatch.serving.dispatcher import Dispatcher
from ecobatch.serving.gate import ContinuousGate
from ecobatch.serving.metrics import Metrics
from ecobatch.serving.pool import Replica, ReplicaPool
from ecobatch.serving.routing import RoutingPolicy


class RecordingMetrics(Metrics):
    """The metrics, keeping every settled request an energy account gave them (for tests to read)."""

    def __init__(self, model: str) -> None:
        super().__init__(
            CollectorRegistry(), model=model, carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD"
        )
        self.settled: list[SettledRequest] = []

    def observe_settled(self, settled: Sequence[SettledRequest], gpu: str) -> None:
        super().observe_settled(settled, gpu)
        self.settled.extend(settled)


def metrics_for(model: str) -> RecordingMetrics:
    return RecordingMetrics(model)


def modelled_account(
    profile: EnergyProfile, metrics: Metrics, clock: Clock | None = None, receipts: Receipts | None = None
) -> EnergyAccount:
    """An energy account on a modelled meter that is never started (tests feed its ledger themselves)."""
    return EnergyAccount(
        receipts or Receipts(),
        metrics,
        profile,
        lambda reports: Meter(Ledger(source="model", prefill_weight=1.0, clock=clock, reports=reports), None),
    )


def settled_by(dispatcher: Dispatcher) -> list[SettledRequest]:
    """The requests the dispatcher's energy accounts have settled so far, in order."""
    metrics = dispatcher._metrics
    assert isinstance(metrics, RecordingMetrics)
    return metrics.settled


def build(
    kind: type[Dispatcher],
    engine: Any,
    profile: EnergyProfile,
    clock: FakeClock,
    *,
    timeout_s: float = 30.0,
    **batching: Any,
) -> tuple[Dispatcher, Ledger]:
    """A static batcher (window 100 ms) or a one-replica gate, and the ledger of its engine."""
    if kind is ContinuousGate:
        gate, ledgers, _ = build_gate([engine], profile, clock, timeout_s=timeout_s, **batching)
        return gate, ledgers[0]
    settings = BatchingSettings(**{"window_min_ms": 100.0, "window_max_ms": 100.0, **batching})
    metrics = metrics_for(engine.model)
    account = modelled_account(profile, metrics, clock)
    batcher = StaticBatcher(
        engine, account, metrics, profile, settings, request_timeout_s=timeout_s, clock=clock
    )
    return batcher, account.ledger


def build_gate(
    engines: list[Any],
    profile: EnergyProfile,
    clock: FakeClock,
    *,
    routing: RoutingPolicy = "pack",
    timeout_s: float = 30.0,
    engine_priority: bool = False,
    **batching: Any,
) -> tuple[ContinuousGate, list[Ledger], Metrics]:
    """A gate over one replica per engine (r0, r1, …, each with a modelled energy account)."""
    settings = BatchingSettings(**batching)
    metrics = metrics_for(engines[0].model)
    receipts = Receipts()
    replicas = [
        Replica(f"r{i}", engine, modelled_account(profile, metrics, clock, receipts))
        for i, engine in enumerate(engines)
    ]
    gate = ContinuousGate(
        ReplicaPool(replicas), metrics, profile, settings,
        request_timeout_s=timeout_s, clock=clock, routing=routing, engine_priority=engine_priority,
    )  # fmt: skip
    return gate, [r.ledger for r in replicas], metrics


async def settle(rounds: int = 50) -> None:
    """Let every task that can run, run (the fake clock stands still)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


__all__ = [
    "ContinuousGate",
    "RecordingMetrics",
    "StaticBatcher",
    "build",
    "build_gate",
    "metrics_for",
    "modelled_account",
    "settle",
    "settled_by",
]

"""Builds a dispatcher of either shape on a fake clock, modelled ledgers and a fresh registry."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from ecobatch.clock import FakeClock
from ecobatch.config import BatchingSettings
from ecobatch.energy.ledger import Ledger
from ecobatch.energy.meter import Meter
from ecobatch.energy.receipts import Receipts
from ecobatch.profile import EnergyProfile
from ecobatch.serving.batcher import StaticBatcher
from ecobatch.serving.dispatcher import Dispatcher
from ecobatch.serving.gate import ContinuousGate
from ecobatch.serving.metrics import Metrics
from ecobatch.serving.pool import Replica, ReplicaPool
from ecobatch.serving.routing import RoutingPolicy


def metrics_for(model: str) -> Metrics:
    return Metrics(CollectorRegistry(), model=model, carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD")


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
    ledger = Ledger(source="model", prefill_weight=1.0, clock=clock)
    batcher = StaticBatcher(
        engine, ledger, Receipts(), metrics_for(engine.model), profile, settings,
        request_timeout_s=timeout_s, clock=clock,
    )  # fmt: skip
    return batcher, ledger


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
    """A gate over one replica per engine (modelled ledgers named r0, r1, …)."""
    settings = BatchingSettings(**batching)
    metrics = metrics_for(engines[0].model)
    replicas = []
    for i, engine in enumerate(engines):
        ledger = Ledger(source="model", prefill_weight=1.0, clock=clock)
        replicas.append(Replica(f"r{i}", engine, Meter(ledger, None)))
    gate = ContinuousGate(
        ReplicaPool(replicas), Receipts(), metrics, profile, settings,
        request_timeout_s=timeout_s, clock=clock, routing=routing, engine_priority=engine_priority,
    )  # fmt: skip
    return gate, [r.ledger for r in replicas], metrics


async def settle(rounds: int = 50) -> None:
    """Let every task that can run, run (the fake clock stands still)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


__all__ = ["ContinuousGate", "StaticBatcher", "build", "build_gate", "metrics_for", "settle"]

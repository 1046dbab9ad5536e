"""Builds a dispatcher of either shape on a fake clock, a modelled ledger and a fresh registry."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from ecobatch.batcher import StaticBatcher
from ecobatch.clock import FakeClock
from ecobatch.config import BatchingSettings
from ecobatch.dispatcher import Dispatcher
from ecobatch.energy.ledger import Ledger
from ecobatch.energy.receipts import Receipts
from ecobatch.gate import ContinuousGate
from ecobatch.metrics import Metrics
from ecobatch.profile import EnergyProfile


def build(
    kind: type[Dispatcher],
    engine: Any,
    profile: EnergyProfile,
    clock: FakeClock,
    *,
    timeout_s: float = 30.0,
    **batching: Any,
) -> tuple[Dispatcher, Ledger]:
    settings = BatchingSettings(**{"window_min_ms": 100.0, "window_max_ms": 100.0, **batching})
    metrics = Metrics(
        CollectorRegistry(), model=engine.model, carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD"
    )
    ledger = Ledger(source="model", gpu="test", prefill_weight=1.0, clock=clock)
    dispatcher = kind(
        engine, ledger, Receipts(), metrics, profile, settings, request_timeout_s=timeout_s, clock=clock
    )
    return dispatcher, ledger


async def settle(rounds: int = 50) -> None:
    """Let every task that can run, run (the fake clock stands still)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


__all__ = ["ContinuousGate", "StaticBatcher", "build", "settle"]

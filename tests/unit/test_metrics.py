"""The metrics' model label: a remote engine's name is known once it answers; nothing stays behind
under the name used before. Settled requests: every one charged, only delivered and complete ones
observed as a served request's energy."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from ecobatch.domain import Usage
from ecobatch.energy.ledger import SettledRequest
from ecobatch.serving.metrics import Metrics


def test_the_model_gauges_move_to_the_engines_name_and_leave_none_behind() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, model="unknown", carbon_g_per_kwh=1, price_per_kwh=1, currency="USD")
    flex = {"model": "unknown", "tier": "flex"}
    assert registry.get_sample_value("ecobatch_queue_depth", flex) == 0
    metrics.set_model("mistral-7b")
    metrics.child(metrics.queue_depth, "mistral-7b", "flex").set(3)
    assert registry.get_sample_value("ecobatch_queue_depth", {"model": "mistral-7b", "tier": "flex"}) == 3
    assert registry.get_sample_value("ecobatch_queue_depth", flex) is None
    for name in ("ecobatch_inflight_sequences", "ecobatch_policy_batch_size"):
        assert registry.get_sample_value(name, {"model": "unknown"}) is None, name
    for name in ("ecobatch_budget_misses_total", "ecobatch_queue_depth"):
        assert registry.get_sample_value(name, flex) is None, name
    assert (
        registry.get_sample_value("ecobatch_budget_misses_total", {"model": "mistral-7b", "tier": "flex"})
        == 0
    )


def _settled(request_id: str, joules: float, source: str, *, delivered: bool = True) -> SettledRequest:
    return SettledRequest(request_id, joules, source, Usage(1, 1), delivered, 0.0, 1.0)


def test_settled_requests_are_all_charged_and_only_delivered_ones_observed() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, model="m", carbon_g_per_kwh=500, price_per_kwh=0.2, currency="EUR")
    metrics.observe_settled(
        [
            _settled("a", 3.0, "nvml"),
            _settled("b", 5.0, "nvml", delivered=False),
            _settled("c", 7.0, "model"),
        ],
        gpu="0",
    )
    metrics.observe_settled([_settled("d", 1.0, "nvml")], gpu="0")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "m", **labels})

    assert value("ecobatch_energy_joules_total", source="nvml", gpu="0") == 9.0
    assert value("ecobatch_energy_joules_total", source="model", gpu="0") == 7.0
    assert value("ecobatch_co2_grams_total", source="nvml") == pytest.approx(9.0 / 3.6e6 * 500)
    assert value("ecobatch_energy_cost_total", source="nvml", currency="EUR") == pytest.approx(
        9.0 / 3.6e6 * 0.2
    )
    assert value("ecobatch_request_energy_joules_count", source="nvml", tier="interactive") == 2
    assert value("ecobatch_request_energy_joules_sum", source="nvml", tier="interactive") == 4.0

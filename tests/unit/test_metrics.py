"""The metrics' model label: a remote engine's name is known once it answers; nothing stays behind
under the name used before."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ecobatch.metrics import Metrics


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

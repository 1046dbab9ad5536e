"""The queue's bookkeeping: one line per tier, the sequence count a window reads, withdrawn requests,
groups taken from the front (priority first), and what is predicted of each request at arrival."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from ecobatch.clock import FakeClock
from ecobatch.config import BatchingSettings
from ecobatch.errors import BadRequest
from ecobatch.serving.admission import Admission
from ecobatch.serving.load import LoadTracker
from ecobatch.serving.metrics import Metrics
from tests.fakes import req


def make(settings: BatchingSettings | None = None, registry: CollectorRegistry | None = None) -> Admission:
    metrics = Metrics(
        registry or CollectorRegistry(), model="m", carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD"
    )
    return Admission(
        settings or BatchingSettings(),
        metrics,
        model="m",
        clock=FakeClock(),
        load=LoadTracker(expected_completion_tokens=100),
        max_prompts_per_request=64,
    )


@pytest.fixture
def admission() -> Admission:
    return make()


async def test_the_queue_counts_sequences_as_they_come_and_go(admission: Admission) -> None:
    admission.submit(req(["a", "b", "c"]))
    admission.submit(req("d"))
    assert admission.queued_sequences == 4
    group = admission.take(3)
    assert [p.request.sequences for p in group] == [3]
    assert admission.queued_sequences == 1
    admission.take(8)
    assert admission.queued_sequences == 0


async def test_the_queue_depth_metric_reads_each_tiers_line_as_it_is() -> None:
    registry = CollectorRegistry()
    admission = make(registry=registry)

    def depth(tier: str) -> float | None:
        return registry.get_sample_value("ecobatch_queue_depth", {"model": "m", "tier": tier})

    admission.submit(req("a"))
    leaving = admission.submit(req("b"))
    admission.submit(req("c", service_tier="priority"))
    assert (depth("interactive"), depth("priority"), depth("flex")) == (2, 1, 0)
    admission.withdraw(leaving)
    admission.drop_cancelled()
    assert depth("interactive") == 1
    admission.take(8)
    assert (depth("interactive"), depth("priority")) == (0, 0)


async def test_a_withdrawn_request_leaves_the_queue_and_the_count(admission: Admission) -> None:
    leaving, staying = admission.submit(req("a")), admission.submit(req(["b", "c"]))
    admission.withdraw(leaving)
    assert leaving.future.cancelled()
    admission.drop_cancelled()
    assert list(admission.in_order()) == [staying]
    assert admission.queued_sequences == 2


async def test_a_future_cancelled_without_withdraw_is_skipped_at_the_head(admission: Admission) -> None:
    gone, staying = admission.submit(req("a")), admission.submit(req("b"))
    gone.future.cancel()
    assert admission.take(1) == [staying]
    assert admission.queued_sequences == 0


async def test_the_head_always_goes_and_a_group_stops_where_it_would_not_fit(admission: Admission) -> None:
    for prompt in ("a", "b", "c"):
        admission.submit(req(prompt))
    group = admission.take(8, fits=lambda requests: len(requests) <= 2)
    assert [p.request.prompts for p in group] == [("a",), ("b",)]
    assert admission.take(8, fits=lambda requests: False)[0].request.prompts == ("c",)
    assert admission.queued_sequences == 0


async def test_failing_the_queue_resolves_every_future_and_empties_the_count(admission: Admission) -> None:
    queued = [admission.submit(req(p)) for p in ("a", "b")]
    admission.fail_queued(RuntimeError("closing"))
    assert all(isinstance(p.future.exception(), RuntimeError) for p in queued)
    assert admission.queued_sequences == 0


async def test_requests_whose_clients_left_hold_no_place_in_a_full_queue() -> None:
    admission = make(BatchingSettings(max_queue=2))
    left = [admission.submit(req(p)) for p in "ab"]
    for pending in left:
        admission.withdraw(pending)
    admission.submit(req("c"))  # not "queue is full: 2 requests"
    assert [p.request.prompts for p in admission.in_order()] == [("c",)]


async def test_each_tier_waits_in_its_own_line_and_priority_is_taken_first(admission: Admission) -> None:
    flex = admission.submit(req("f", service_tier="flex"))
    interactive = admission.submit(req("i"))
    priority = admission.submit(req("p", service_tier="priority"))
    assert (flex.tier, interactive.tier, priority.tier) == ("flex", "interactive", "priority")
    assert [list(q) for q in admission.waiting().values()] == [[priority], [interactive], [flex]]
    assert admission.take(8) == [priority, interactive, flex]


async def test_a_tier_the_engine_does_not_keep_is_served_as_interactive() -> None:
    metrics = Metrics(CollectorRegistry(), model="m", carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD")
    static = Admission(
        BatchingSettings(), metrics, model="m", clock=FakeClock(), load=LoadTracker(),
        max_prompts_per_request=64, tiers=frozenset({"priority", "interactive"}),
    )  # fmt: skip
    assert static.submit(req("f", service_tier="flex")).tier == "interactive"


async def test_each_request_is_predicted_from_what_recent_ones_generated(admission: Admission) -> None:
    """Until a request has finished, one asking for max_tokens is predicted to use all of them; once
    recent ones stop (EOS) at half their max_tokens, the next is predicted to stop at half too."""
    first = admission.submit(req("a b c d", max_tokens=40))
    assert first.output_tokens == 40
    assert first.kv_tokens == pytest.approx(40 + 7 * 0.25)  # 7 characters at 0.25 tokens each
    for _ in range(4):
        admission.load.finished(
            max_tokens=40, completion_tokens_per_sequence=20, decode_s=1.0, mean_concurrency=1
        )
    assert admission.submit(req("a", max_tokens=100)).output_tokens == pytest.approx(50.0)


async def test_more_prompts_than_one_request_may_hold_is_refused_naming_the_setting() -> None:
    admission = make()
    with pytest.raises(BadRequest, match=r"server.max_prompts_per_request=64"):
        admission.submit(req([f"p{i}" for i in range(65)]))

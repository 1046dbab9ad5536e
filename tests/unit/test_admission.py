"""The queue's bookkeeping: the sequence count a window reads, withdrawn requests, and groups taken
from the head."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from ecobatch.admission import Admission
from ecobatch.clock import FakeClock
from ecobatch.config import BatchingSettings
from ecobatch.domain import Headroom
from ecobatch.metrics import Metrics
from ecobatch.profile import EnergyProfile
from tests.fakes import req


@pytest.fixture
def admission(reference_profile: EnergyProfile) -> Admission:
    metrics = Metrics(CollectorRegistry(), model="m", carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD")
    return Admission(
        BatchingSettings(), reference_profile, metrics, model="m", headroom=Headroom, clock=FakeClock()
    )


async def test_the_queue_counts_sequences_as_they_come_and_go(admission: Admission) -> None:
    admission.submit(req(["a", "b", "c"]), None)
    admission.submit(req("d"), None)
    assert admission.queued_sequences == 4
    group = admission.take(3)
    assert [p.request.sequences for p in group] == [3]
    assert admission.queued_sequences == 1
    admission.take(8)
    assert admission.queued_sequences == 0


async def test_a_withdrawn_request_leaves_the_queue_and_the_count(admission: Admission) -> None:
    leaving, staying = admission.submit(req("a"), None), admission.submit(req(["b", "c"]), None)
    admission.withdraw(leaving)
    assert leaving.future.cancelled()
    admission.drop_cancelled()
    assert list(admission.queue) == [staying]
    assert admission.queued_sequences == 2


async def test_a_future_cancelled_without_withdraw_is_skipped_at_the_head(admission: Admission) -> None:
    gone, staying = admission.submit(req("a"), None), admission.submit(req("b"), None)
    gone.future.cancel()
    assert admission.take(1) == [staying]
    assert admission.queued_sequences == 0


async def test_the_head_always_goes_and_a_group_stops_where_it_would_not_fit(admission: Admission) -> None:
    for prompt in ("a", "b", "c"):
        admission.submit(req(prompt), None)
    group = admission.take(8, fits=lambda requests: len(requests) <= 2)
    assert [p.request.prompts for p in group] == [("a",), ("b",)]
    assert admission.take(8, fits=lambda requests: False)[0].request.prompts == ("c",)
    assert admission.queued_sequences == 0


async def test_failing_the_queue_resolves_every_future_and_empties_the_count(admission: Admission) -> None:
    queued = [admission.submit(req(p), None) for p in ("a", "b")]
    admission.fail_queued(RuntimeError("closing"))
    assert all(isinstance(p.future.exception(), RuntimeError) for p in queued)
    assert admission.queued_sequences == 0


async def test_requests_whose_clients_left_hold_no_place_in_a_full_queue(
    reference_profile: EnergyProfile,
) -> None:
    metrics = Metrics(CollectorRegistry(), model="m", carbon_g_per_kwh=500, price_per_kwh=0.1, currency="USD")
    admission = Admission(
        BatchingSettings(max_queue=2),
        reference_profile,
        metrics,
        model="m",
        headroom=Headroom,
        clock=FakeClock(),
    )
    left = [admission.submit(req(p), None) for p in "ab"]
    for pending in left:
        admission.withdraw(pending)
    admission.submit(req("c"), None)  # not "queue is full: 2 requests"
    assert [p.request.prompts for p in admission.queue] == [("c",)]

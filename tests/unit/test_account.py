"""A replica's energy account, the one writer of its requests' estimates and receipts: a served request's
provisional figure becomes its pending receipt and then its settled one; a request that ended without the
engine's count is charged an estimate of its tokens; each request reaches the receipts and the metrics
once; its ledger reports to it from construction on, under its meter's ``gpu`` label."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from ecobatch.clock import FakeClock
from ecobatch.domain import GenerationRequest, Usage
from ecobatch.energy.account import Charge, EnergyAccount, estimated_usage
from ecobatch.energy.counters import NvmlCounters
from ecobatch.energy.gpu import FakeGpu
from ecobatch.energy.ledger import Ledger, SettledRequest
from ecobatch.energy.meter import Meter
from ecobatch.energy.receipts import Receipts
from ecobatch.profile import EnergyProfile
from tests.fakes import req
from tests.unit.dispatch_helpers import RecordingMetrics

IDLE_W = 100.0


class CountingReceipts(Receipts):
    """The receipts store, counting what it is asked to write for each request."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, str]] = []  # (kind, request id)

    def pending(self, request_id: str, *, provisional_joules: float, source: str) -> None:
        self.writes.append(("pending", request_id))
        super().pending(request_id, provisional_joules=provisional_joules, source=source)

    def settle(self, settled: SettledRequest) -> None:
        self.writes.append(("settled", settled.request_id))
        super().settle(settled)


def account_on(
    profile: EnergyProfile, clock: FakeClock
) -> tuple[EnergyAccount, CountingReceipts, RecordingMetrics]:
    """Replica r0's account: an NVML meter (never started: the tests hand its ledger the intervals)."""
    receipts, metrics = CountingReceipts(), RecordingMetrics("m")
    account = EnergyAccount(
        receipts,
        metrics,
        profile,
        lambda reports: Meter(
            Ledger(source="nvml", prefill_weight=1.0, idle_power_w=IDLE_W, clock=clock, reports=reports),
            NvmlCounters([FakeGpu(0)]),
            gpu_prefix="r0:",
        ),
    )
    return account, receipts, metrics


def prepared(
    prompt: Any = "a b c", prompt_tokens: tuple[int, ...] = (3,), **body: object
) -> GenerationRequest:
    """A request as an engine's ``prepare`` leaves it: its prompt measured."""
    return msgspec.structs.replace(req(prompt, **body), prompt_tokens=prompt_tokens)


async def test_a_served_request_gets_its_provisional_figure_as_a_pending_receipt_then_the_settled_one(
    continuous_profile: EnergyProfile,
) -> None:
    clock = FakeClock()
    account, receipts, metrics = account_on(continuous_profile, clock)
    request = prepared(max_tokens=40)
    span = account.begin(request.id, request.sequences, "interactive")
    await clock.advance(1.0)
    charge = account.end(span, request, Usage(3, 40), delivered=True, dispatched_s=0.0, in_flight=1)
    provisional = continuous_profile.at(1.0).joules_per_token * 40  # alone: its mean concurrency is 1
    assert charge == Charge(pytest.approx(provisional), "nvml", pytest.approx(1.0))
    assert receipts.get(request.id) == {
        "id": request.id,
        "source": "nvml",
        "provisional_joules": pytest.approx(provisional),
        "provisional_basis": "profile (modelled)",
        "status": "pending",
    }
    account.ledger.add_interval(0.0, 1.0, 300.0)  # the counter's second: 100 J idle, 200 J above it
    assert receipts.get(request.id)["status"] == "pending"  # type: ignore[index]
    account.ledger.add_interval(1.0, 1.1, 10.0)  # the next reading: the intervals are past its end
    receipt = receipts.get(request.id)
    assert receipt is not None and receipt["status"] == "settled"
    assert receipt["energy_joules"] == pytest.approx(200.0)
    assert receipt["provisional_joules"] == pytest.approx(provisional), "the provisional figure is kept"
    assert (receipt["prompt_tokens"], receipt["completion_tokens"]) == (3, 40)
    assert metrics.registry.get_sample_value(
        "ecobatch_energy_joules_total", {"model": "m", "source": "nvml", "gpu": "r0:0"}
    ) == pytest.approx(200.0)


async def test_a_request_without_the_engines_count_is_charged_its_prompt_and_what_it_decoded_meanwhile(
    continuous_profile: EnergyProfile,
) -> None:
    """Its client left after 2 s with four sequences on the engine: its prompt and what one of four
    sequences decodes in 2 s at the profile's rate. One with a small ``max_tokens`` is charged at most
    that. Neither was answered: no pending receipt, only the settled one."""
    clock = FakeClock()
    account, receipts, _ = account_on(continuous_profile, clock)
    long_, short = prepared("a b c", max_tokens=10_000), prepared("d e", (2,), max_tokens=5)
    spans = [account.begin(r.id, r.sequences, "interactive") for r in (long_, short)]
    await clock.advance(2.0)
    for request, span in zip((long_, short), spans, strict=True):
        assert account.end(span, request, None, dispatched_s=0.0, in_flight=4) is None
    assert receipts.get(long_.id) is None and receipts.get(short.id) is None
    account.ledger.add_interval(0.0, 2.0, 500.0)
    account.ledger.add_interval(2.0, 2.1, 10.0)
    decoded = int(2.0 * continuous_profile.at(4).tokens_per_s / 4)
    assert decoded > 5, "the cap binds for the short one"
    settled = {r.id: receipts.get(r.id) for r in (long_, short)}
    assert [(s["prompt_tokens"], s["completion_tokens"], s["basis"]) for s in settled.values() if s] == [
        (3, decoded, "no_engine_count"),
        (2, 5, "no_engine_count"),
    ]
    assert sum(s["energy_joules"] for s in settled.values() if s) == pytest.approx(500.0 - 2 * IDLE_W)


async def test_a_request_that_failed_after_its_tokens_were_seen_is_charged_those(
    continuous_profile: EnergyProfile,
) -> None:
    clock = FakeClock()
    account, receipts, _ = account_on(continuous_profile, clock)
    request = prepared(max_tokens=100)
    span = account.begin(request.id, 1, "interactive")
    await clock.advance(0.5)
    span.generated(7)  # a stream's chunks: the engine's own count of what came out
    await clock.advance(1.5)
    account.end(span, request, None, dispatched_s=0.0, in_flight=1)
    account.ledger.add_interval(0.0, 2.0, 400.0)
    account.ledger.add_interval(2.0, 2.1, 10.0)
    receipt = receipts.get(request.id)
    assert receipt is not None and receipt["completion_tokens"] == 7, "not the profile's estimate"
    assert receipt["basis"] == "no_engine_count"


def test_the_estimate_decodes_at_the_profiles_rate_per_sequence_capped_by_max_tokens(
    continuous_profile: EnergyProfile,
) -> None:
    two = prepared(["a b", "c d e"], (2, 3), max_tokens=1_000)
    per_sequence_at_2 = continuous_profile.at(2).tokens_per_s / 2
    # fewer in flight than its own sequences: it runs at least with itself
    assert estimated_usage(two, continuous_profile, 1.5, in_flight=0) == Usage(
        5, int(1.5 * per_sequence_at_2 * 2)
    )
    per_sequence_at_8 = continuous_profile.at(8).tokens_per_s / 8
    assert estimated_usage(two, continuous_profile, 1.5, in_flight=8) == Usage(
        5, int(1.5 * per_sequence_at_8 * 2)
    )
    assert estimated_usage(two, continuous_profile, 3_600.0, in_flight=8) == Usage(5, 2_000)
    unmeasured = msgspec.structs.replace(two, prompt_tokens=None)
    assert estimated_usage(unmeasured, continuous_profile, 0.0, in_flight=1) == Usage(0, 0)


async def test_each_request_reaches_the_receipts_and_the_metrics_once(
    continuous_profile: EnergyProfile,
) -> None:
    """Served, failed and left requests overlapping across several intervals, reported in several calls:
    one pending receipt per served request, one settled receipt and one metrics observation each."""
    clock = FakeClock()
    account, receipts, metrics = account_on(continuous_profile, clock)
    requests = [prepared(f"p{i}", max_tokens=20) for i in range(12)]
    served: list[str] = []
    t = 0.0
    for i, request in enumerate(requests):
        span = account.begin(request.id, 1, "interactive")
        await clock.advance(0.25)
        if i % 3 == 2:
            account.end(span, request, None, dispatched_s=t, in_flight=2)
        else:
            account.end(span, request, Usage(1, 20), delivered=i % 3 == 0, dispatched_s=t, in_flight=2)
            served.append(request.id)
        account.ledger.add_interval(t, t + 0.25, 60.0)
        t += 0.25
    account.ledger.flush()
    ids = [r.id for r in requests]
    assert sorted(receipts.writes) == sorted([("pending", i) for i in served] + [("settled", i) for i in ids])
    assert sorted(s.request_id for s in metrics.settled) == sorted(ids)


async def test_the_ledger_reports_to_its_account_from_construction_under_the_meters_label(
    continuous_profile: EnergyProfile,
) -> None:
    clock = FakeClock()
    account, _, metrics = account_on(continuous_profile, clock)
    assert account.gpu == account.meter.gpu == "r0:0" and account.source == "nvml"
    account.ledger.add_interval(0.0, 1.0, 150.0)  # nothing in flight: idle, then other work
    labels = {"source": "nvml", "gpu": "r0:0"}
    assert metrics.registry.get_sample_value("ecobatch_idle_energy_joules_total", labels) == IDLE_W
    assert metrics.registry.get_sample_value("ecobatch_unattributed_energy_joules_total", labels) == 50.0

"""What a request added to the GPU's energy, by the power curve (``energy.marginal``), and where it shows."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecobatch.clock import FakeClock
from ecobatch.config import load_settings
from ecobatch.domain import Usage
from ecobatch.energy.attribution import InFlight
from ecobatch.energy.choose import MeterSpec, build_meter
from ecobatch.energy.ledger import Ledger, LedgerReports, SettledRequest
from ecobatch.energy.marginal import MarginalModel, PowerCurve, marginal_joules
from ecobatch.energy.receipts import Receipts
from ecobatch.profile import EnergyProfile, profile_from_mapping


def linear(watts_per_sequence: float, at_one_w: float) -> PowerCurve:
    """P(0) = 0, P(1) = at_one_w, then watts_per_sequence more per sequence."""
    return lambda n: 0.0 if n <= 0 else at_one_w + watts_per_sequence * (n - 1)


def flight(start_s: float, end_s: float, sequences: int = 1) -> InFlight:
    return InFlight(start_s, end_s, sequences, 0.0, 0.0)


def test_a_request_alone_on_the_gpu_adds_all_the_power_it_alone_draws() -> None:
    assert marginal_joules(0.0, 1.0, [flight(0.25, 0.75)], linear(5, 300)) == [pytest.approx(150.0)]


def test_requests_together_each_add_what_one_more_sequence_draws() -> None:
    """Two in flight all the interval on a curve of 300 W at 1 and +5 W per sequence: each adds 5 W."""
    added = marginal_joules(0.0, 1.0, [flight(0.0, 1.0), flight(0.0, 1.0)], linear(5, 300))
    assert added == [pytest.approx(5.0), pytest.approx(5.0)]


def test_the_stretch_a_request_runs_alone_is_its_own_busy_time() -> None:
    """A from 0 to 1 s, B from 0.5 s: while A is alone (0.5 s) it adds P(1); together each adds 5 W."""
    added = marginal_joules(0.0, 1.0, [flight(0.0, 1.0), flight(0.5, 1.0)], linear(5, 300))
    assert added == [pytest.approx(0.5 * 300 + 0.5 * 5), pytest.approx(0.5 * 5)]


def test_another_clients_sequences_make_ours_cheaper_to_add() -> None:
    alone = marginal_joules(0.0, 1.0, [flight(0.0, 1.0)], linear(5, 300))
    beside = marginal_joules(0.0, 1.0, [flight(0.0, 1.0)], linear(5, 300), other_sequences=3)
    assert alone == [pytest.approx(300.0)] and beside == [pytest.approx(5.0)]


def test_a_request_of_several_sequences_adds_what_all_of_them_draw() -> None:
    added = marginal_joules(0.0, 1.0, [flight(0.0, 1.0, sequences=4), flight(0.0, 1.0)], linear(5, 300))
    assert added == [pytest.approx(4 * 5.0), pytest.approx(5.0)]


def test_an_instant_adds_nothing_and_time_outside_the_interval_is_not_counted() -> None:
    added = marginal_joules(
        1.0, 2.0, [flight(1.5, 1.5), flight(1.0, 1.5), flight(0.5, 1.25), flight(2.5, 3.0)], linear(5, 300)
    )
    # [1, 1.25): two running, 5 W each; [1.25, 1.5): the second alone, 300 W; the last is outside
    assert added == [0.0, pytest.approx(0.25 * 5 + 0.25 * 300), pytest.approx(0.25 * 5), 0.0]


PROFILE = {
    "kind": "continuous",
    "name": "curve",
    "source": "measured",
    "idle_power_w": 100.0,
    "points": [
        {"concurrency": 1, "tokens_per_s": 100.0, "joules_per_token": 3.0, "power_w": 400.0},
        {"concurrency": 4, "tokens_per_s": 380.0, "joules_per_token": 1.1, "power_w": 420.0},
    ],
}


def test_the_profiles_curve_is_its_power_above_idle_in_proportion_below_one_and_flat_beyond() -> None:
    profile = profile_from_mapping(PROFILE)
    assert profile.power_above_idle_w(0) == 0.0
    assert profile.power_above_idle_w(0.5) == pytest.approx(150.0)
    assert profile.power_above_idle_w(1) == pytest.approx(300.0)
    assert profile.power_above_idle_w(2) == pytest.approx(310.0)  # half way in log2 from 1 to 4
    assert profile.power_above_idle_w(4) == pytest.approx(320.0)
    assert profile.power_above_idle_w(64) == pytest.approx(320.0)
    with pytest.raises(ValueError, match="has no idle_power_w"):
        profile_from_mapping({**PROFILE, "idle_power_w": None}).power_above_idle_w(1)


CURVE = profile_from_mapping(PROFILE).power_above_idle_w  # P(1) = 300 W, P(2) = 310 W, P(4) = 320 W


def on_clock(clock: FakeClock, settled: list[SettledRequest], **kwargs: object) -> Ledger:
    return Ledger(
        source="nvml",
        prefill_weight=1.0,
        idle_power_w=100.0,
        clock=clock,
        reports=LedgerReports(settled=settled.extend),
        **kwargs,  # type: ignore[arg-type]
    )


async def settle_two(**kwargs: object) -> dict[str, SettledRequest]:
    """Two requests on a fake clock: A alone for 0.5 s, then A and B together for 0.5 s, in two intervals
    of the counter (so A's figure is the sum over both); then a quiet interval."""
    settled: list[SettledRequest] = []
    clock = FakeClock()
    ledger = on_clock(clock, settled, **kwargs)
    a = ledger.begin("a")
    await clock.advance(0.5)
    b = ledger.begin("b")
    await clock.advance(0.5)
    a.end(Usage(100, 10))
    b.end(Usage(0, 10))
    ledger.add_interval(0.0, 0.5, 200.0)
    ledger.add_interval(0.5, 1.0, 250.0)
    ledger.add_interval(1.0, 2.0, 100.0)
    return {s.request_id: s for s in settled}


async def test_the_ledger_reports_each_requests_marginal_beside_its_share_and_a_receipt_shows_it() -> None:
    settled = await settle_two(marginal=MarginalModel(CURVE))
    # A alone for 0.5 s at P(1) = 300 W, then beside B at P(2) - P(1) = 10 W; B 10 W for 0.5 s
    assert settled["a"].marginal_joules == pytest.approx(0.5 * 300 + 0.5 * 10)
    assert settled["b"].marginal_joules == pytest.approx(0.5 * 10)
    assert settled["a"].joules + settled["b"].joules == pytest.approx(350.0)  # the share: all above idle
    receipts = Receipts()
    receipts.settle(settled["b"])
    receipt = receipts.get("b")
    assert receipt is not None
    assert receipt["marginal_energy_joules"] == pytest.approx(5.0)
    assert receipt["marginal_basis"] == "profile power curve and prefill point (modelled)"


async def test_a_prompt_adds_its_excess_over_the_curve_per_token() -> None:
    settled = await settle_two(marginal=MarginalModel(CURVE, prompt_excess_joules_per_token=0.25))
    assert settled["a"].marginal_joules == pytest.approx(155.0 + 100 * 0.25)  # A's 100 prompt tokens
    assert settled["b"].marginal_joules == pytest.approx(5.0)  # B had none


async def test_without_a_model_no_marginal_is_reported() -> None:
    settled = await settle_two()
    assert [s.marginal_joules for s in settled.values()] == [None, None]
    receipts = Receipts()
    receipts.settle(settled["a"])
    receipt = receipts.get("a")
    assert receipt is not None and "marginal_energy_joules" not in receipt


async def test_another_clients_sequences_in_an_interval_lower_what_ours_adds() -> None:
    settled: list[SettledRequest] = []
    clock = FakeClock()
    ledger = on_clock(clock, settled, marginal=MarginalModel(CURVE))
    span = ledger.begin("a")
    await clock.advance(1.0)
    span.end(Usage(0, 10))
    ledger.add_interval(0.0, 1.0, 500.0, other_sequences=3)
    ledger.add_interval(1.0, 2.0, 100.0)
    # P(4) - P(3) for 1 s: 320 - (310 + 10 * log2(1.5)) W
    (only,) = settled
    assert only.marginal_joules == pytest.approx(320 - (310 + 10 * math.log2(1.5)))


async def test_a_gap_in_the_counter_does_not_cut_the_marginal_which_needs_no_counter() -> None:
    settled: list[SettledRequest] = []
    clock = FakeClock()
    ledger = on_clock(clock, settled, marginal=MarginalModel(CURVE))
    span = ledger.begin("a")
    await clock.advance(2.0)
    span.end(Usage(0, 10))
    ledger.add_interval(0.0, 1.0, 400.0)
    ledger.add_gap(1.0, 2.0)
    ledger.add_interval(2.0, 3.0, 100.0)
    (only,) = settled
    assert not only.complete  # its charge is an underestimate, and says so
    assert only.marginal_joules == pytest.approx(2.0 * 300)


def with_prefill_point(concurrency: object, per_token: float = 0.5) -> EnergyProfile:
    meta = {"prefill": {"concurrency": concurrency, "prompt_tokens_per_s": 1000.0}}
    return profile_from_mapping({**PROFILE, "prefill_joules_per_token": per_token, "meta": meta})


def test_a_profile_gives_its_prompts_excess_over_the_curve_at_its_prefill_points_concurrency() -> None:
    """The prefill point (2 in flight, 1,000 prompt tokens/s, 0.5 J per prompt token above idle) against
    the curve at 2 (310 W, between the points at 1 and 4): 0.5 - 310 / 1000 J per prompt token."""
    model = MarginalModel.of(with_prefill_point(2))
    assert model is not None and model.prompt_excess_joules_per_token == pytest.approx(0.5 - 0.31)


@pytest.mark.parametrize("concurrency", [True, "2", None, 0, -1])
def test_a_prefill_point_without_a_usable_concurrency_gives_no_excess(concurrency: object) -> None:
    model = MarginalModel.of(with_prefill_point(concurrency))
    assert model is not None and model.prompt_excess_joules_per_token == 0.0


def test_a_prefill_point_that_draws_less_than_the_curve_adds_nothing_not_a_negative() -> None:
    model = MarginalModel.of(with_prefill_point(2, per_token=0.1))  # 0.1 < 310 W / 1000 tokens/s
    assert model is not None and model.prompt_excess_joules_per_token == 0.0


def test_a_profile_without_a_prefill_point_or_an_idle_power() -> None:
    without_point = MarginalModel.of(profile_from_mapping(PROFILE))
    assert without_point is not None and without_point.prompt_excess_joules_per_token == 0.0
    assert MarginalModel.of(profile_from_mapping({**PROFILE, "idle_power_w": None})) is None


async def test_the_meter_the_proxy_builds_reports_the_profiles_marginal_with_the_prompts_excess() -> None:
    """``build_meter`` (a modelled meter here) gives its ledger the profile's model: a request alone for
    1 s with 100 prompt tokens adds P(1) x 1 s + 100 x (0.5 - 310 / 1000) J."""
    settled: list[SettledRequest] = []
    clock = FakeClock()
    settings = load_settings(None, {"energy.meter": "model"})
    meter = build_meter(
        MeterSpec(settings), with_prefill_point(2), clock=clock, reports=LedgerReports(settled=settled.extend)
    )
    span = meter.ledger.begin("a")
    await clock.advance(1.0)
    span.end(Usage(100, 10))
    meter.ledger.add_interval(0.0, 1.0, None)
    meter.ledger.add_interval(1.0, 2.0, None)
    (only,) = settled
    assert only.marginal_joules == pytest.approx(300.0 + 100 * (0.5 - 0.31))


def by_definition(
    t0: float, t1: float, members: list[InFlight], curve: PowerCurve, others: float
) -> list[float]:
    """The definition, stretch by stretch and member by member (slow, plain), inside [t0, t1)."""
    cuts = sorted({t0, t1, *(m.start_s for m in members), *(m.end_s for m in members)})
    cuts = [t for t in cuts if t0 <= t <= t1]
    out = [0.0] * len(members)
    for a, b in pairwise(cuts):
        running = [i for i, m in enumerate(members) if m.start_s <= a and b <= m.end_s]
        n = sum(members[i].sequences for i in running) + others
        for i in running:
            out[i] += (curve(n) - curve(n - members[i].sequences)) * (b - a)
    return out


@given(
    spans=st.lists(
        st.tuples(st.floats(-0.5, 1.5), st.floats(-0.5, 1.5), st.integers(1, 4)), min_size=0, max_size=12
    ),
    others=st.sampled_from([0.0, 0.5, 3.0]),
)
def test_the_sweep_gives_what_the_definition_gives(
    spans: list[tuple[float, float, int]], others: float
) -> None:
    members = [flight(min(a, b), max(a, b), s) for a, b, s in spans]
    curve = profile_from_mapping(PROFILE).power_above_idle_w
    expected = by_definition(0.0, 1.0, members, curve, others)
    assert marginal_joules(0.0, 1.0, members, curve, others) == pytest.approx(expected, abs=1e-9)

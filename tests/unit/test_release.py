"""The release controller on plain numbers: no clock, no loop, no engine. Each test states one rule of
``release.plan_releases`` (or of the energy model and the safety limit it uses)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from ecobatch.domain import Tier
from ecobatch.profile import EnergyProfile
from ecobatch.serving.release import (
    RELEASE_MARGIN_S,
    UNLIMITED,
    Limit,
    LoadEstimate,
    ReleaseSettings,
    ReplicaState,
    group_due_s,
    hold_saving_j,
    inflight_limit,
    plan_releases,
    replicas_needed,
)


@dataclass(eq=False)
class W:
    """A waiting request."""

    tier: Tier
    arrival_s: float
    output_tokens: float = 256.0
    kv_tokens: float = 320.0
    sequences: int = 1


SETTINGS = ReleaseSettings(
    interactive_budget_s=0.1,
    flex_budget_s=30.0,
    min_saving_fraction=0.02,
    flex_queue_limit=512,
    idle_power_w=121.8,
)
STEADY = LoadEstimate(arrival_rate_per_s=4.0, output_tokens_sample=(16, 32, 64, 128, 256, 512))
QUIET = LoadEstimate(arrival_rate_per_s=0.0, output_tokens_sample=())


def idle(limit: int = UNLIMITED, kv_room: float | None = None) -> ReplicaState:
    return ReplicaState(
        up=True, inflight=0, other_running=0, busy_until_s=None, limit=Limit(limit, "none", kv_room)
    )


def busy(inflight: int = 1, until_s: float = 2.0, limit: int = UNLIMITED) -> ReplicaState:
    return ReplicaState(
        up=True, inflight=inflight, other_running=0, busy_until_s=until_s, limit=Limit(limit, "none")
    )


def plan(
    profile: EnergyProfile,
    waiting: dict[Tier, Sequence[W]],
    replicas: Sequence[ReplicaState],
    *,
    now_s: float = 0.0,
    load: LoadEstimate = STEADY,
    settings: ReleaseSettings = SETTINGS,
):  # type: ignore[no-untyped-def]
    return plan_releases(now_s, waiting, replicas, load, profile, settings)


# ---- interactive ------------------------------------------------------------------------------------------
def test_a_busy_replica_takes_interactive_requests_at_once(continuous_profile: EnergyProfile) -> None:
    a, b = W("interactive", 0.0), W("interactive", 0.0)
    result = plan(continuous_profile, {"interactive": [a, b]}, [busy()])
    assert [(r.request, r.reason) for r in result.releases] == [(a, "busy"), (b, "busy")]
    assert result.holds == () and result.wake_at_s is None


def test_on_an_idle_replica_a_hold_that_pays_lasts_until_the_budget(
    continuous_profile: EnergyProfile,
) -> None:
    """40 req/s of requests as long as this one: four are expected in its 100 ms budget, and each would
    otherwise start up to 100 ms late and stretch the busy time."""
    a = W("interactive", 0.0, output_tokens=512)
    result = plan(continuous_profile, {"interactive": [a]}, [idle()], load=LoadEstimate(40.0, (512,) * 6))
    assert result.releases == ()
    (hold,) = result.holds
    budget_end = 0.1 - RELEASE_MARGIN_S  # a timer's lateness is allowed for
    assert (hold.tier, hold.reason, hold.until_s) == ("interactive", "hold_saving", pytest.approx(budget_end))
    assert hold.predicted_saving_j > 0
    assert result.wake_at_s == pytest.approx(budget_end)


def test_a_flex_group_going_now_ends_the_interactive_hold_on_that_replica(
    continuous_profile: EnergyProfile,
) -> None:
    """The same round releases a due flex group onto the idle replica the interactive request was to be
    held on: that replica is busy now, so the interactive request joins it at once."""
    waiting = W("interactive", 30.0, output_tokens=512)
    due = W("flex", 0.0, output_tokens=512)
    result = plan(
        continuous_profile,
        {"interactive": [waiting], "flex": [due]},
        [idle()],
        now_s=30.0,
        load=LoadEstimate(40.0, (512,) * 6),  # alone, the interactive one would be held (test above)
    )
    assert [(r.request, r.reason) for r in result.releases] == [(due, "budget"), (waiting, "busy")]
    assert result.holds == () and result.wake_at_s is None


def test_at_its_budget_the_held_group_goes(continuous_profile: EnergyProfile) -> None:
    group = [W("interactive", 0.0, 512), W("interactive", 0.05, 512)]
    result = plan(continuous_profile, {"interactive": group}, [idle()], now_s=0.1)
    assert [(r.request, r.reason) for r in result.releases] == [(group[0], "budget"), (group[1], "budget")]


def test_with_no_arrival_expected_holding_saves_nothing_and_the_request_goes(
    continuous_profile: EnergyProfile,
) -> None:
    a = W("interactive", 0.0)
    result = plan(continuous_profile, {"interactive": [a]}, [idle()], load=QUIET)
    assert [(r.request, r.reason) for r in result.releases] == [(a, "no_saving")]


def test_a_hold_that_would_save_less_than_the_minimum_share_is_not_made(
    continuous_profile: EnergyProfile,
) -> None:
    """A long request with short ones expected: they would end inside its busy time anyway."""
    a = W("interactive", 0.0, output_tokens=512)
    load = LoadEstimate(arrival_rate_per_s=4.0, output_tokens_sample=(16,) * 6)
    saving, group = hold_saving_j(
        continuous_profile,
        group_output_tokens=[512],
        hold_s=0.1,
        arrival_rate_per_s=4.0,
        output_tokens_sample=[16] * 6,
        idle_power_w=121.8,
    )
    assert saving < 0.02 * group
    result = plan(continuous_profile, {"interactive": [a]}, [idle()], load=load)
    assert [r.reason for r in result.releases] == ["no_saving"]


def test_a_short_request_is_held_at_most_its_own_service_time(continuous_profile: EnergyProfile) -> None:
    short = W("interactive", 0.0, output_tokens=16)
    result = plan(continuous_profile, {"interactive": [short]}, [idle()], load=LoadEstimate(4.0, (512,) * 6))
    (hold,) = result.holds
    assert hold.until_s == pytest.approx(16 / 210, rel=1e-3)  # 16 tokens at 210 tok/s alone, < 100 ms


def test_the_measured_time_to_first_token_comes_off_the_budget(continuous_profile: EnergyProfile) -> None:
    a = W("interactive", 0.0, output_tokens=512)
    load = LoadEstimate(40.0, (512,) * 6, ttft_s=0.03)
    (hold,) = plan(continuous_profile, {"interactive": [a]}, [idle()], load=load).holds
    assert hold.until_s == pytest.approx(0.07 - RELEASE_MARGIN_S)


# ---- priority -----------------------------------------------------------------------------------------
def test_priority_is_never_held_even_on_an_idle_replica(continuous_profile: EnergyProfile) -> None:
    p = W("priority", 0.0, output_tokens=512)
    result = plan(continuous_profile, {"priority": [p]}, [idle()], load=LoadEstimate(100.0, (512,) * 6))
    assert [(r.request, r.reason) for r in result.releases] == [(p, "priority")]


def test_a_priority_request_that_finds_no_room_holds_everyone_behind_it(
    continuous_profile: EnergyProfile,
) -> None:
    p, i = W("priority", 0.0), W("interactive", 0.0)
    result = plan(continuous_profile, {"priority": [p], "interactive": [i]}, [busy(inflight=4, limit=4)])
    assert result.releases == ()
    assert {(h.tier, h.reason) for h in result.holds} == {("priority", "limit"), ("interactive", "limit")}


# ---- flex -----------------------------------------------------------------------------------------------
def test_flex_gathers_while_the_replica_is_busy(continuous_profile: EnergyProfile) -> None:
    f = W("flex", 0.0, output_tokens=512)
    result = plan(continuous_profile, {"flex": [f]}, [busy(until_s=1.0)], now_s=0.5)
    assert result.releases == ()
    (hold,) = result.holds
    assert (hold.reason, hold.until_s) == ("gathering", 30.0 - RELEASE_MARGIN_S)
    assert result.wake_at_s == 30.0 - RELEASE_MARGIN_S


def test_the_flex_group_goes_together_when_the_oldest_budget_runs_out(
    continuous_profile: EnergyProfile,
) -> None:
    group = [W("flex", 0.0), W("flex", 12.0), W("flex", 29.0)]
    result = plan(continuous_profile, {"flex": group}, [idle()], now_s=30.0)
    assert [(r.request, r.reason) for r in result.releases] == [(w, "budget") for w in group]


def test_past_saturation_the_flex_group_goes_before_a_later_member_would_miss_its_budget(
    continuous_profile: EnergyProfile,
) -> None:
    """The engine starts sequences at a bounded rate when full: 2,000 flex requests that came in 10 s
    cannot all start within their budgets if the group waits for the oldest one's."""
    group = [W("flex", i * 0.005, output_tokens=512) for i in range(2000)]
    starts_per_s = 256 * continuous_profile.at(256).tokens_per_s / 256 / 512  # ~32 a second
    due, oldest = group_due_s(group, SETTINGS, STEADY, free_slots=256, starts_per_s=starts_per_s)
    # the last member arrived at 10 s and would start (1999 - 256) / 32 = 54 s after the release: it binds
    expected = 1999 * 0.005 + 30.0 - RELEASE_MARGIN_S - 1743 / starts_per_s
    assert not oldest and due == pytest.approx(expected, abs=0.01)
    result = plan(continuous_profile, {"flex": group}, [idle()], now_s=due)
    assert {r.reason for r in result.releases} == {"group_full"}
    few = group[:256]  # all start at once: the oldest one's budget sets the time
    due_few = group_due_s(few, SETTINGS, STEADY, free_slots=256, starts_per_s=starts_per_s)
    assert due_few == (30.0 - RELEASE_MARGIN_S, True)


def test_a_replica_limited_below_its_curve_starts_a_flex_group_sooner(
    continuous_profile: EnergyProfile,
) -> None:
    """The rate at which a full engine starts sequences is the rate at its limit, not at its largest
    measured concurrency: 400 flex requests behind a limit of 8 must start long before the oldest
    budget runs out, while without a limit they can still wait."""
    group = [W("flex", i * 0.05, output_tokens=512) for i in range(400)]
    unlimited = plan(continuous_profile, {"flex": group}, [idle()], now_s=20.0)
    assert unlimited.releases == ()
    limited = plan(continuous_profile, {"flex": group}, [idle(limit=8)], now_s=20.0)
    assert [r.reason for r in limited.releases] == ["group_full"] * 8  # as many as the limit takes
    kv_for_8 = idle(kv_room=8 * 320.0 + 1)  # KV room for 8 of these (320 tokens each), no other limit
    by_kv = plan(continuous_profile, {"flex": group}, [kv_for_8], now_s=20.0)
    assert {r.reason for r in by_kv.releases} == {"group_full"} and len(by_kv.releases) == 8


def test_a_flex_line_that_fills_half_the_queue_goes(continuous_profile: EnergyProfile) -> None:
    settings = ReleaseSettings(0.1, 30.0, 0.02, flex_queue_limit=4)
    group = [W("flex", 0.0) for _ in range(4)]
    result = plan(continuous_profile, {"flex": group}, [idle()], now_s=1.0, settings=settings)
    assert [r.reason for r in result.releases] == ["queue_full"] * 4
    assert (
        plan(continuous_profile, {"flex": group[:3]}, [idle()], now_s=1.0, settings=settings).releases == ()
    )


def test_a_flex_request_that_ends_before_the_busy_replica_does_joins_it(
    continuous_profile: EnergyProfile,
) -> None:
    short, long = W("flex", 0.0, output_tokens=16), W("flex", 0.0, output_tokens=512)
    result = plan(continuous_profile, {"flex": [short, long]}, [busy(until_s=1.0)])
    assert [(r.request, r.reason) for r in result.releases] == [(short, "fits_busy")]
    (hold,) = result.holds
    assert (hold.count, hold.reason) == (1, "gathering")


# ---- the safety limit and routing ------------------------------------------------------------------------
def test_under_the_limit_each_request_that_fits_goes_and_a_long_one_does_not_block_a_short_one(
    continuous_profile: EnergyProfile,
) -> None:
    state = ReplicaState(
        up=True, inflight=1, other_running=0, busy_until_s=5.0, limit=Limit(UNLIMITED, "none", 1000.0)
    )
    long, short = W("interactive", 0.0, kv_tokens=2000), W("interactive", 0.0, kv_tokens=200)
    result = plan(continuous_profile, {"interactive": [long, short]}, [state])
    assert [r.request for r in result.releases] == [short]
    (hold,) = result.holds
    assert (hold.count, hold.reason) == (1, "limit")


def test_a_request_overdue_by_its_own_service_time_reserves_the_next_room(
    continuous_profile: EnergyProfile,
) -> None:
    state = ReplicaState(
        up=True, inflight=1, other_running=0, busy_until_s=50.0, limit=Limit(UNLIMITED, "none", 1000.0)
    )
    long = W("interactive", 0.0, output_tokens=512, kv_tokens=2000)  # 2.44 s alone
    short = W("interactive", 0.0, output_tokens=16, kv_tokens=200)
    result = plan(continuous_profile, {"interactive": [long, short]}, [state], now_s=3.0)
    assert result.releases == (), "the long one has waited 2.9 s past its budget: it goes next"


def test_pack_fills_the_fullest_replica_with_room_and_round_robin_alternates(
    continuous_profile: EnergyProfile,
) -> None:
    waiting: dict[Tier, Sequence[W]] = {"interactive": [W("interactive", 0.0) for _ in range(3)]}
    replicas = [busy(inflight=1, limit=3), busy(inflight=0, limit=3)]
    packed = plan(continuous_profile, waiting, replicas)
    assert [r.replica for r in packed.releases] == [0, 0, 1]
    round_robin = ReleaseSettings(
        interactive_budget_s=0.1,
        flex_budget_s=30.0,
        min_saving_fraction=0.02,
        flex_queue_limit=512,
        routing="round-robin",
    )
    spread = plan(continuous_profile, waiting, replicas, settings=round_robin)
    assert [r.replica for r in spread.releases] == [0, 1, 0]


# ---- the energy model and the limit ---------------------------------------------------------------------
def test_holding_saves_the_lag_of_arrivals_that_would_have_started_late(
    continuous_profile: EnergyProfile,
) -> None:
    """One expected arrival as long as the group: released now it starts a (uniform in [0, h)) later and
    stretches the busy time by a, h/2 on average, at the power above idle of two in flight."""
    h = 0.5
    saving, group = hold_saving_j(
        continuous_profile,
        group_output_tokens=[210.0],  # 1 s alone
        hold_s=h,
        arrival_rate_per_s=2.0,  # one arrival expected in the hold
        output_tokens_sample=[210.0 * continuous_profile.at(2).tokens_per_s / 2 / 210.0],
        idle_power_w=121.8,
    )
    power = continuous_profile.at(2).power_w - 121.8
    assert saving == pytest.approx(1.0 * h / 2 * power)
    assert group == pytest.approx((continuous_profile.at(1).power_w - 121.8) * 1.0)


def test_nothing_is_saved_without_arrivals_or_without_time(continuous_profile: EnergyProfile) -> None:
    kwargs = dict(group_output_tokens=[100.0], output_tokens_sample=[100.0], idle_power_w=121.8)
    assert hold_saving_j(continuous_profile, hold_s=0.5, arrival_rate_per_s=0.0, **kwargs)[0] == 0.0  # type: ignore[arg-type]
    assert hold_saving_j(continuous_profile, hold_s=0.0, arrival_rate_per_s=5.0, **kwargs)[0] == 0.0  # type: ignore[arg-type]


def test_a_burst_at_one_instant_is_a_finite_saving(continuous_profile: EnergyProfile) -> None:
    saving, _ = hold_saving_j(
        continuous_profile,
        group_output_tokens=[16.0, 16.0],
        hold_s=0.05,
        arrival_rate_per_s=math.inf,
        output_tokens_sample=[16.0],
        idle_power_w=121.8,
    )
    assert math.isfinite(saving) and saving > 0


def test_the_limit_is_a_safety_limit_never_an_energy_choice(continuous_profile: EnergyProfile) -> None:
    free = inflight_limit(
        continuous_profile, kv_capacity_tokens=None, kv_promised_tokens=0, other_sequences=0,
        tokens_per_sequence=300, tpot_slo_s=None, max_inflight=None,
    )  # fmt: skip
    assert (free.sequences, free.limited_by, free.kv_room_tokens) == (UNLIMITED, "none", None)
    tpot = inflight_limit(
        continuous_profile, kv_capacity_tokens=None, kv_promised_tokens=0, other_sequences=0,
        tokens_per_sequence=300, tpot_slo_s=0.008, max_inflight=None,
    )  # fmt: skip
    assert tpot.limited_by == "tpot"
    assert (
        continuous_profile.at(tpot.sequences).step_s
        <= 0.008
        < continuous_profile.at(tpot.sequences + 1).step_s
    )
    slower = inflight_limit(
        continuous_profile, kv_capacity_tokens=None, kv_promised_tokens=0, other_sequences=0,
        tokens_per_sequence=300, tpot_slo_s=0.008, max_inflight=None, speed_factor=0.5,
    )  # fmt: skip
    assert slower.sequences < tpot.sequences, "an engine measured slower than the profile steps slower"
    kv = inflight_limit(
        continuous_profile, kv_capacity_tokens=10_000, kv_promised_tokens=3_000, other_sequences=2,
        tokens_per_sequence=500, tpot_slo_s=None, max_inflight=64,
    )  # fmt: skip
    assert (kv.sequences, kv.limited_by, kv.kv_room_tokens) == (64, "max_inflight", 6_000)
    assert Limit(64, "none", 100.0).binding(300.0) == "kv"


# ---- the scale signal -------------------------------------------------------------------------------------
def test_the_replicas_a_load_needs_grow_with_the_load_and_shrink_with_what_a_replica_holds(
    continuous_profile: EnergyProfile,
) -> None:
    def needed(rate: float, limit: int = UNLIMITED, tokens: float = 256.0) -> float:
        return replicas_needed(
            continuous_profile,
            arrival_rate_per_s=rate,
            output_tokens_per_request=tokens,
            limit_sequences=limit,
        )

    assert needed(0.0) == 0.0
    assert needed(20.0) == pytest.approx(2 * needed(10.0))
    assert needed(10.0, tokens=512) == pytest.approx(2 * needed(10.0))
    # a replica limited to 8 sequences holds far fewer than one running full: more of them are needed
    assert needed(10.0, limit=8) > 10 * needed(10.0)
    # on the H200 curve a replica full at 256 sequences decodes at most profile.at(256) tokens a second
    full = continuous_profile.max_size
    capacity_per_s = continuous_profile.at(full).tokens_per_s / 256.0  # 256-token requests a second
    assert needed(capacity_per_s) == pytest.approx(1.0)

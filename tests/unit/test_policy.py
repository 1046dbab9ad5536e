from __future__ import annotations

import pytest

from ecobatch.domain import Demand, Headroom
from ecobatch.profile import EnergyProfile, ProfilePoint
from ecobatch.serving.policy import choose_batch_size

DEMAND = Demand(prompt_tokens=128, completion_tokens=256)


def choose(profile: EnergyProfile, **kw: object):  # type: ignore[no-untyped-def]
    args = {
        "slo_s": 1e9,
        "max_batch_sequences": 64,
        "energy_tolerance": 0.05,
        "headroom": Headroom(),
        "demand": DEMAND,
    }
    args.update(kw)
    headroom, demand = args.pop("headroom"), args.pop("demand")
    return choose_batch_size(profile, headroom, demand, **args)  # type: ignore[arg-type]


def test_unconstrained_it_picks_the_smallest_size_within_tolerance_of_the_best(
    reference_profile: EnergyProfile,
) -> None:
    d = choose(reference_profile)
    best = reference_profile.at(64).joules_per_token
    assert d.joules_per_token <= best * 1.05
    assert reference_profile.at(d.batch_size - 1).joules_per_token > best * 1.05
    assert d.limited_by == "energy"


def test_zero_tolerance_takes_the_minimum_energy_size(reference_profile: EnergyProfile) -> None:
    d = choose(reference_profile, energy_tolerance=0.0)
    assert d.batch_size == 64
    assert d.limited_by == "max_batch_sequences"


def test_max_batch_sequences_caps_the_choice(reference_profile: EnergyProfile) -> None:
    d = choose(reference_profile, max_batch_sequences=8)
    assert d.batch_size == 8
    assert d.limited_by == "max_batch_sequences"


def test_kv_headroom_caps_the_batch(reference_profile: EnergyProfile) -> None:
    # 10 sequences of 384 tokens fit in 3,840 free KV tokens, 11 do not
    d = choose(reference_profile, headroom=Headroom(kv_free_tokens=3840))
    assert d.batch_size == 10
    assert d.limited_by == "kv"
    assert d.kv_limit == 10


def test_inflight_sequences_already_hold_their_kv(reference_profile: EnergyProfile) -> None:
    d = choose(reference_profile, headroom=Headroom(kv_free_tokens=3840), inflight=6)
    assert d.kv_limit == 16
    assert d.batch_size == 16


def test_no_kv_room_still_allows_one_sequence(reference_profile: EnergyProfile) -> None:
    d = choose(reference_profile, headroom=Headroom(kv_free_tokens=0))
    assert d.batch_size == 1


def _slow_large_batches() -> EnergyProfile:
    # step time grows with batch size: 10 ms at 1, 40 ms at 8, 160 ms at 64
    pts = (
        ProfilePoint(1, 100.0, 2.0, 200.0),
        ProfilePoint(8, 200.0, 1.0, 200.0),
        ProfilePoint(64, 400.0, 0.5, 200.0),
    )
    return EnergyProfile(name="t", source="modelled", points=pts)


def test_the_latency_slo_caps_the_batch() -> None:
    profile = _slow_large_batches()
    # 256 tokens × 40 ms = 10.24 s fits at BS 8; larger batches step slower
    d = choose(profile, slo_s=10.3, energy_tolerance=0.0)
    assert d.batch_size == 8
    assert d.limited_by == "slo"
    assert d.expected_latency_s <= 10.3


def test_an_unreachable_slo_falls_back_to_batch_size_one() -> None:
    d = choose(_slow_large_batches(), slo_s=0.001)
    assert d.batch_size == 1
    assert d.limited_by == "slo"


def test_the_window_counts_against_the_slo() -> None:
    profile = _slow_large_batches()
    without = choose(profile, slo_s=10.3, energy_tolerance=0.0)
    with_window = choose(profile, slo_s=10.3, energy_tolerance=0.0, window_s=0.1)
    assert with_window.batch_size < without.batch_size


@pytest.mark.parametrize("tolerance", [0.0, 0.05, 0.2, 0.5])
def test_the_choice_is_never_worse_than_the_tolerance(
    reference_profile: EnergyProfile, tolerance: float
) -> None:
    d = choose(reference_profile, energy_tolerance=tolerance)
    assert d.joules_per_token <= reference_profile.at(64).joules_per_token * (1 + tolerance) + 1e-12


def test_for_a_continuous_engine_it_chooses_an_in_flight_cap_on_the_per_concurrency_curve(
    continuous_profile: EnergyProfile,
) -> None:
    """On the H200 vLLM curve J/token keeps falling to 256 in flight; a 20 s SLO for 256-token answers
    and the KV cache bound the cap instead."""
    assert continuous_profile.kind == "continuous"
    d = choose(continuous_profile, max_batch_sequences=256, energy_tolerance=0.0)
    assert (d.batch_size, d.limited_by) == (256, "max_batch_sequences")
    slo = choose(continuous_profile, max_batch_sequences=256, energy_tolerance=0.0, slo_s=2.0)
    # per-sequence time per token = C / tok/s(C): 256 tokens within 2 s needs <= 7.8 ms a token
    assert slo.limited_by == "slo" and slo.expected_latency_s <= 2.0
    assert continuous_profile.at(slo.batch_size + 1).step_s * 256 > 2.0
    kv = choose(
        continuous_profile,
        max_batch_sequences=256,
        energy_tolerance=0.0,
        headroom=Headroom(kv_free_tokens=384 * 40),
        inflight=8,
    )
    assert (kv.batch_size, kv.limited_by) == (48, "kv")

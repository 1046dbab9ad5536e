from __future__ import annotations

import pytest

from ecobatch.energy import ModelledMeter, split_by_tokens
from ecobatch.openai_api import Usage
from ecobatch.profile import EnergyProfile


def test_attribution_adds_up_to_the_span_total() -> None:
    usages = [Usage(17, 5), Usage(3, 250), Usage(120, 1), Usage(0, 33)]
    for total in (0.0, 1.0, 123.456, 1e-9, 98765.4321):
        shares = split_by_tokens(total, usages, prefill_weight=0.3)
        assert sum(shares) == pytest.approx(total, rel=1e-12, abs=1e-15)
        assert all(s >= 0 for s in shares)


def test_attribution_is_proportional_to_weighted_tokens() -> None:
    shares = split_by_tokens(100.0, [Usage(10, 10), Usage(0, 30)], prefill_weight=1.0)
    assert shares == pytest.approx([40.0, 60.0])
    shares = split_by_tokens(100.0, [Usage(10, 10), Usage(0, 30)], prefill_weight=0.0)
    assert shares == pytest.approx([25.0, 75.0])


def test_requests_without_tokens_share_equally() -> None:
    assert split_by_tokens(9.0, [Usage(), Usage(), Usage()], prefill_weight=1.0) == pytest.approx([3, 3, 3])


def test_no_requests_get_nothing() -> None:
    assert split_by_tokens(5.0, [], prefill_weight=1.0) == []


async def test_modelled_meter_charges_the_profile_j_per_token_at_the_span_concurrency(
    reference_profile: EnergyProfile,
) -> None:
    now = [0.0]
    meter = ModelledMeter(reference_profile, prefill_weight=1.0, clock=lambda: now[0])
    span = meter.begin(concurrency=8)
    now[0] = 2.0
    energy = await meter.end(span, [Usage(10, 100), Usage(10, 300)])
    assert energy.source == "model"
    assert energy.total_joules == pytest.approx(0.827 * 400)
    assert sum(energy.per_request_joules) == pytest.approx(energy.total_joules)
    assert energy.duration_s == 2.0
    assert energy.mean_power_w == pytest.approx(0.827 * 400 / 2.0)
    assert "modelled" in energy.gpu

"""The static policy's batch size spends at most 1.1× the joules per request of the best one a sweep finds,
on every shipped static profile at loads it can serve (modelled: `ecobatch tune`'s engine model). On a
continuous engine there is no size to choose from the curve: asking for one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecobatch.profile import load_profile
from ecobatch.tools.tune.oracle import policy_vs_oracle

PROFILES = Path(__file__).resolve().parents[2] / "configs" / "profiles"
CASES = [
    (name, rate)
    for name, rates in {
        "a800-mistral7b-int8-reference": (0.25, 0.5, 1.0, 1.5),
        "h200-mistral7b-int8": (0.25, 0.5, 1.0, 1.5),
        "h200-mistral7b-bf16": (0.25, 0.5, 1.0, 1.5),
    }.items()
    for rate in rates
]


@pytest.mark.parametrize(("name", "rate"), CASES)
def test_the_policy_is_within_a_tenth_of_the_oracle(name: str, rate: float) -> None:
    row = policy_vs_oracle(load_profile(PROFILES / f"{name}.yaml"), rate, duration_s=200.0)
    assert row["ratio"] <= 1.1, row


def test_a_continuous_profile_has_no_size_to_check() -> None:
    with pytest.raises(ValueError, match="safety limit"):
        policy_vs_oracle(load_profile(PROFILES / "h200-vllm-mistral7b-bf16.yaml"), 4.0, duration_s=10.0)

"""The policy against the oracle (static engines): the batch size that ``policy.choose_batch_size`` picks
for a workload, against the best one a sweep finds, both run through the engine model (``sim``) with the
same window and the same arrivals (a **model**, on the profile).

Continuous engines have no such choice to check: on them the in-flight limit is a safety limit (KV
room, an inter-token objective), never an energy choice (the curve falls all the way to saturation)."""

from __future__ import annotations

import statistics
from typing import Any

from ...domain import Demand, Headroom
from ...profile import EnergyProfile
from ...serving.policy import choose_batch_size
from ..bench.workload import parse_lengths, poisson
from .sim import BatcherRule, simulate_static

__all__ = ["policy_vs_oracle"]

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def policy_vs_oracle(
    profile: EnergyProfile,
    rate_per_s: float,
    *,
    output_tokens: str = "choice:16,32,64,128,256,512",
    prompt_tokens: float = 64.0,
    slo_s: float = 30.0,
    window_s: tuple[float, float] = (0.05, 0.1),
    duration_s: float = 300.0,
    seeds: int = 1,
) -> dict[str, Any]:
    if profile.kind != "static":
        raise ValueError(
            f"profile {profile.name} is continuous: its in-flight limit is a safety limit, not a size to "
            "choose from the curve (nothing to compare with an oracle)"
        )
    lengths = parse_lengths(output_tokens, "output_tokens")
    one = parse_lengths("1", "prompt")
    workloads = [
        poisson(rate_per_s, one, lengths, duration_s=duration_s, count=None, seed=s) for s in range(seeds)
    ]
    mean_output = statistics.fmean(a.output_tokens for w in workloads for a in w)
    decision = choose_batch_size(
        profile,
        Headroom(),
        Demand(prompt_tokens, mean_output),
        slo_s=slo_s,
        max_batch_sequences=max(SIZES),
        energy_tolerance=0.05,
    )

    def joules_per_request(size: int) -> float:
        results = [simulate_static(profile, w, BatcherRule(*window_s, batch_size=size)) for w in workloads]
        return statistics.fmean(r.joules_per_request for r in results)

    swept = {size: joules_per_request(size) for size in SIZES if size <= profile.max_size}
    oracle = min(swept, key=lambda size: swept[size])
    chosen = joules_per_request(decision.batch_size)
    return {
        "profile": profile.name,
        "kind": profile.kind,
        "rate_per_s": rate_per_s,
        "policy_size": decision.batch_size,
        "policy_joules_per_request": chosen,
        "oracle_size": oracle,
        "oracle_joules_per_request": swept[oracle],
        "ratio": chosen / swept[oracle],
    }

"""The short version of the soak (benchmarks/reliability.py soak runs it for 10 minutes): twice what
the simulated engine can serve, for 20 s: every request is served or shed, none is lost or hangs."""

from __future__ import annotations

from pathlib import Path

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.profile import load_profile
from ecobatch.testing.servers import start_proxy, wait_healthy
from ecobatch.testing.soak import soak

MAX_TOKENS = 32


async def test_twice_the_capacity_is_served_or_shed_and_nothing_is_lost(tmp_path: Path) -> None:
    profile = load_profile(DEFAULT_PROFILES["static"])
    capacity_per_s = profile.at(64).tokens_per_s / MAX_TOKENS  # a full batch of 64, modelled
    proxy = start_proxy(
        ["--sim-time-scale", "1", "--max-queue", "128", "--max-batch-sequences", "64"], tmp_path, name="soak"
    )
    try:
        wait_healthy([proxy], timeout_s=60)
        result = await soak(
            proxy, seconds=20, rate_per_s=2 * capacity_per_s, max_tokens=MAX_TOKENS, warmup_s=5
        )
    finally:
        proxy.stop()
    assert result["lost_or_hung"] == 0, result
    assert result["served"] > 0 and result["shed"] > 0, result  # overloaded: both happen
    assert result["event_loop_lag_p99_s"] <= 0.1, result

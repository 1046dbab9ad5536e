"""The prefill point of a calibration: inside the served context, and its energy above idle per token."""

from __future__ import annotations

import pytest

from ecobatch.tools.calibrate.measure import EnergyWindow
from ecobatch.tools.calibrate.sweeps import _fit_prompt, prefill_point


def test_the_prefill_prompt_fits_the_served_context_with_one_token_to_generate() -> None:
    assert _fit_prompt(1024, 512) == 511
    assert _fit_prompt(1024, 4096) == 1024
    assert _fit_prompt(1024, None) == 1024


def test_the_prefill_point_is_energy_above_idle_per_prompt_token() -> None:
    window = EnergyWindow(counters=None, seconds=10.0, joules=6_000.0)  # type: ignore[arg-type]
    point = prefill_point(window, 400_000, idle_power_w=120.0, concurrency=8, prompt_len=1024)
    assert point["joules_per_token"] == pytest.approx((6_000.0 - 1_200.0) / 400_000)
    assert point["prompt_tokens_per_s"] == pytest.approx(40_000.0)
    assert point["power_w"] == pytest.approx(600.0)

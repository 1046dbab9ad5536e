"""Idle power measured live: the median of quiet windows, robust to a burst the engine does not see."""

from __future__ import annotations

import pytest

from ecobatch.energy.idle import IdleEstimator


def test_the_start_up_figure_stands_until_enough_quiet_windows_are_in() -> None:
    idle = IdleEstimator(120.0, window_s=1.0, min_windows=3)
    for _ in range(2):
        idle.quiet(150.0, 1.0)
    assert (idle.power_w, idle.live) == (120.0, False)
    idle.quiet(150.0, 1.0)
    assert (idle.power_w, idle.live) == (150.0, True)


def test_short_quiet_intervals_gather_into_windows_and_busy_time_breaks_one() -> None:
    idle = IdleEstimator(100.0, window_s=1.0, min_windows=1)
    idle.quiet(60.0, 0.5)
    idle.busy()  # the half-second before is dropped, not stretched over the busy time
    idle.quiet(65.0, 0.5)
    idle.quiet(65.0, 0.5)
    assert idle.power_w == pytest.approx(130.0)


def test_a_burst_of_unseen_work_moves_one_window_not_the_estimate() -> None:
    idle = IdleEstimator(100.0, window_s=1.0, windows=5, min_windows=3)
    for joules in (130.0, 131.0, 600.0, 129.0, 130.0):
        idle.quiet(joules, 1.0)
    assert idle.power_w == pytest.approx(130.0)


@pytest.mark.parametrize("kwargs", [{"window_s": 0.0}, {"min_windows": 0}, {"windows": 2, "min_windows": 3}])
def test_impossible_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        IdleEstimator(100.0, **kwargs)  # type: ignore[arg-type]

"""Idle power measured live: the mean of the quiet windows near their median: robust to a burst the
engine does not see, and unbiased by a counter that moves in steps."""

from __future__ import annotations

import pytest

from ecobatch.energy.idle import IdleEstimator, band_mean_w


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


def test_a_counter_that_moves_in_steps_is_not_read_low() -> None:
    # NVML's counter on an H200 moves every 100 ms; a meter sampling every 103.5 ms gathers 1 s windows
    # of 10 intervals that hold 10 steps mostly and 11 now and then: their median is the 10-step value
    # (117.9 W here: what the median alone read)
    true_w, step_s, sample_s = 122.0, 0.1, 0.1035
    idle = IdleEstimator(100.0, window_s=1.0, windows=31, min_windows=3)
    t, last = 0.0, 0.0
    for _ in range(31 * 10):
        t += sample_s
        counted = true_w * step_s * int(t / step_s + 1e-9)  # the counter's value: whole steps only
        idle.quiet(counted - last, sample_s)
        last = counted
    assert idle.power_w == pytest.approx(true_w, rel=0.01)


def test_the_band_keeps_windows_near_the_median_and_weighs_them_by_time() -> None:
    # 2 s at 120 W and 1 s at 132 W (+10 %) are within the band around the median (120 W): 372 J / 3 s;
    # 160 W (+33 %) is work the engine did not report, left out
    assert band_mean_w([(240.0, 2.0), (132.0, 1.0), (160.0, 1.0)]) == pytest.approx(372.0 / 3.0)
    with pytest.raises(ValueError, match="seconds > 0"):
        band_mean_w([(10.0, 0.0)])


def test_two_far_apart_groups_give_the_lower_not_a_power_between_them() -> None:
    # an even count with nothing near the middle: the low median is a window of the quiet group
    assert band_mean_w([(120.0, 1.0), (122.0, 1.0), (600.0, 1.0), (610.0, 1.0)]) == pytest.approx(121.0)


@pytest.mark.parametrize("kwargs", [{"window_s": 0.0}, {"min_windows": 0}, {"windows": 2, "min_windows": 3}])
def test_impossible_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        IdleEstimator(100.0, **kwargs)  # type: ignore[arg-type]

"""The live load estimates the controller decides from, on injected times: arrival rates over a sliding
window that follow a load change within seconds and fall in a lull, the length mix, predicted lengths
that learn how much of max_tokens requests use, and the engine's speed against the profile."""

from __future__ import annotations

import pytest

from ecobatch.profile import EnergyProfile
from ecobatch.serving.load import LoadTracker


def arrive(
    tracker: LoadTracker, rate_per_s: float, start_s: float, seconds: float, tier: str = "interactive"
) -> float:
    t, gap = start_s, 1.0 / rate_per_s
    while t < start_s + seconds:
        tracker.arrived(t, tier, 100.0, 200.0)  # type: ignore[arg-type]
        t += gap
    return t


def test_a_steady_stream_reads_as_its_rate() -> None:
    tracker = LoadTracker(window_s=10.0)
    end = arrive(tracker, 4.0, 0.0, 30.0)
    assert tracker.rate_per_s(end) == pytest.approx(4.0, rel=0.05)


def test_a_step_from_2_to_12_and_back_is_followed_within_a_window() -> None:
    tracker = LoadTracker(window_s=5.0)
    t = arrive(tracker, 2.0, 0.0, 20.0)
    assert tracker.rate_per_s(t) == pytest.approx(2.0, rel=0.1)
    t = arrive(tracker, 12.0, t, 5.0)
    assert tracker.rate_per_s(t) == pytest.approx(12.0, rel=0.1), "5 s after the step up"
    t = arrive(tracker, 2.0, t, 5.0)
    assert tracker.rate_per_s(t) == pytest.approx(2.0, rel=0.15), "5 s after the step down"


def test_the_rate_falls_during_a_lull_instead_of_remembering_the_burst() -> None:
    tracker = LoadTracker(window_s=10.0)
    t = arrive(tracker, 20.0, 0.0, 2.0)
    assert tracker.rate_per_s(t + 2.0) <= 0.5
    assert tracker.rate_per_s(t + 60.0) == 0.0


def test_each_tier_is_counted_on_its_own() -> None:
    tracker = LoadTracker(window_s=10.0)
    arrive(tracker, 4.0, 0.0, 10.0, tier="interactive")
    end = arrive(tracker, 2.0, 0.0, 10.0, tier="flex")
    assert tracker.rate_per_s(end, ("interactive",)) == pytest.approx(4.0, rel=0.1)
    assert tracker.rate_per_s(end, ("flex",)) == pytest.approx(2.0, rel=0.1)
    assert tracker.estimate(end).arrival_rate_per_s == pytest.approx(4.0, rel=0.1), "flex never joins a hold"
    assert len(tracker.estimate(end).output_tokens_sample) > 0


def test_a_burst_at_one_instant_reads_as_its_share_of_the_window() -> None:
    """40 requests at once are 4 a second over a 10 s window: not an endless stream that would make an
    idle engine hold them for arrivals that are not coming."""
    tracker = LoadTracker(window_s=10.0)
    for _ in range(40):
        tracker.arrived(5.0, "interactive", 10, 20)
    assert tracker.rate_per_s(5.0) == pytest.approx(4.0)


def test_predicted_lengths_learn_the_share_of_max_tokens_that_requests_use() -> None:
    tracker = LoadTracker(expected_completion_tokens=300)
    assert tracker.predict_output_tokens(100) == 100, "until one has finished: all of max_tokens"
    assert tracker.predict_output_tokens(None) == 300, "no max_tokens: the configured expectation"
    for _ in range(10):
        tracker.finished(max_tokens=100, completion_tokens_per_sequence=25, decode_s=1, mean_concurrency=1)
        tracker.finished(max_tokens=None, completion_tokens_per_sequence=40, decode_s=1, mean_concurrency=1)
    assert tracker.predict_output_tokens(400) == pytest.approx(100)
    assert tracker.predict_output_tokens(None) == pytest.approx(40)


def test_prompt_lengths_learn_tokens_per_character_from_the_engines_counts() -> None:
    tracker = LoadTracker()
    assert tracker.predict_prompt_tokens(400) == 100  # 4 characters a token until measured
    tracker.prompt_measured(characters=300, prompt_tokens=100)
    assert tracker.predict_prompt_tokens(300) == pytest.approx(100)


def test_the_engine_speed_is_measured_against_the_profile_at_the_same_concurrency(
    continuous_profile: EnergyProfile,
) -> None:
    tracker = LoadTracker(profile=continuous_profile)
    assert tracker.speed_factor == 1.0
    per_sequence = continuous_profile.at(8).tokens_per_s / 8
    for _ in range(5):  # an engine half as fast as the profile says, at 8 in flight
        tracker.finished(
            max_tokens=256,
            completion_tokens_per_sequence=256,
            decode_s=256 / (per_sequence / 2),
            mean_concurrency=8,
        )
    assert tracker.speed_factor == pytest.approx(0.5)
    tracker.first_token(0.04)
    assert tracker.estimate(0.0).speed_factor == pytest.approx(0.5)
    assert tracker.estimate(0.0).ttft_s == pytest.approx(0.04)

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ecobatch.errors import ConfigError
from ecobatch.profile import EnergyProfile, fit_power_law, load_profile, profile_from_mapping


def test_reference_profile_uses_the_seed_j_per_1k_tokens_column(reference_profile: EnergyProfile) -> None:
    assert reference_profile.source == "reference"
    assert reference_profile.at(1).joules_per_token == pytest.approx(5.781)
    assert reference_profile.at(64).joules_per_token == pytest.approx(0.248)
    # power = J/token × tok/s: 105 W at BS 1 on an A800 is plausible; 1 W (the J/request column) is not
    assert reference_profile.at(1).power_w == pytest.approx(104.6, abs=0.1)


def test_measured_points_are_returned_exactly(reference_profile: EnergyProfile) -> None:
    for p in reference_profile.points:
        assert reference_profile.at(p.size) == p


def test_interpolation_is_linear_in_log2_batch_size(reference_profile: EnergyProfile) -> None:
    mid = reference_profile.at(math.sqrt(2 * 4))  # halfway between 2 and 4 on a log axis
    assert mid.joules_per_token == pytest.approx((3.091 + 1.580) / 2)
    assert mid.tokens_per_s == pytest.approx((36.48 + 72.96) / 2)


def test_interpolated_values_stay_between_their_neighbours(reference_profile: EnergyProfile) -> None:
    for bs in range(1, 65):
        j = reference_profile.at(bs).joules_per_token
        assert 0.248 <= j <= 5.781


def test_beyond_the_largest_point_step_time_and_j_per_token_stay_flat(
    reference_profile: EnergyProfile,
) -> None:
    top, beyond = reference_profile.at(64), reference_profile.at(128)
    assert beyond.joules_per_token == top.joules_per_token
    assert beyond.step_s == pytest.approx(top.step_s)


def test_fitted_exponent_of_the_seed_is_near_its_stated_078(reference_profile: EnergyProfile) -> None:
    _, alpha = fit_power_law(reference_profile.points)
    assert alpha == pytest.approx(0.78, abs=0.05)


def test_a_point_needs_exactly_one_energy_column() -> None:
    with pytest.raises(ConfigError, match="exactly one of joules_per_token"):
        profile_from_mapping(
            {"name": "x", "kind": "static", "points": [{"batch_size": 1, "tokens_per_s": 10}]}
        )


def test_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"points\[0\]\.tokens_per_s=-1"):
        profile_from_mapping(
            {
                "name": "x",
                "kind": "static",
                "points": [{"batch_size": 1, "tokens_per_s": -1, "joules_per_token": 1}],
            }
        )
    with pytest.raises(ConfigError, match=r"points\[0\]\.tokens_per_sec is not a point field"):
        profile_from_mapping(
            {
                "name": "x",
                "kind": "static",
                "points": [{"batch_size": 1, "tokens_per_sec": 3, "joules_per_token": 1}],
            }
        )


def test_duplicate_batch_sizes_are_refused() -> None:
    point = {"batch_size": 2, "tokens_per_s": 10, "joules_per_token": 1}
    with pytest.raises(ConfigError, match="distinct"):
        profile_from_mapping({"name": "x", "kind": "static", "points": [point, point]})


def test_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"energy\.profile=.*no such file"):
        load_profile(tmp_path / "nope.yaml")


def test_a_profile_says_whether_it_is_static_or_continuous() -> None:
    point = {"tokens_per_s": 10, "joules_per_token": 1}
    with pytest.raises(ConfigError, match=r"x\.kind=None must be one of \('static', 'continuous'\)"):
        profile_from_mapping({"name": "x", "points": [{"batch_size": 1, **point}]}, where="x")
    with pytest.raises(ConfigError, match=r"batch_size does not belong in a kind: continuous profile"):
        profile_from_mapping({"kind": "continuous", "points": [{"batch_size": 1, **point}]})
    continuous = profile_from_mapping({"kind": "continuous", "points": [{"concurrency": 4, **point}]})
    assert continuous.kind == "continuous" and continuous.max_size == 4


def test_the_continuous_reference_is_the_h200_vllm_curve(continuous_profile: EnergyProfile) -> None:
    assert (continuous_profile.kind, continuous_profile.source) == ("continuous", "reference")
    assert continuous_profile.at(1).joules_per_1k_tokens == pytest.approx(2349)
    assert continuous_profile.at(64).power_w == pytest.approx(663)
    assert continuous_profile.idle_power_w == pytest.approx(121.8)


def test_every_shipped_profile_loads_and_the_embedded_copies_match_configs() -> None:
    root = Path(__file__).resolve().parents[2]
    shipped = sorted((root / "configs" / "profiles").glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        assert load_profile(path).points
    for embedded in (root / "proxy" / "ecobatch" / "data").glob("*.yaml"):
        assert embedded.read_text() == (root / "configs" / "profiles" / embedded.name).read_text()


def test_an_error_in_a_profile_file_names_the_file_then_the_field(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("kind: continuous\nname: mine\nsource: measured\npoints: []\n")
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert str(caught.value) == f"{path}: profile.points must be a non-empty list"


@pytest.mark.parametrize(
    ("prefill", "rate"),
    [
        ({"prompt_tokens_per_s": 41_760.85}, 41_760.85),
        ({"prompt_tokens_per_s": 0}, None),
        ({"prompt_tokens_per_s": -5.0}, None),
        ({"prompt_tokens_per_s": math.nan}, None),
        ({"prompt_tokens_per_s": True}, None),
        ({"prompt_tokens_per_s": "fast"}, None),
        ({}, None),
        ("not a mapping", None),
    ],
)
def test_the_prefill_rate_is_the_calibrated_prefill_points_where_it_is_a_positive_number(
    prefill: object, rate: float | None
) -> None:
    point = {"concurrency": 1, "tokens_per_s": 100.0, "joules_per_token": 2.0, "power_w": 300.0}
    profile = profile_from_mapping(
        {"name": "x", "kind": "continuous", "points": [point], "meta": {"prefill": prefill}}
    )
    assert profile.prefill_tokens_per_s == rate

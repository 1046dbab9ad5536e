"""The benchmark's arrivals are reproducible and have the rates and lengths asked for."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from ecobatch.tools.bench import add_arguments, build_arrivals
from ecobatch.tools.bench.workload import bursty, diurnal, parse_lengths, poisson, read_trace


def test_poisson_arrivals_have_the_asked_rate_and_are_reproducible() -> None:
    fixed = parse_lengths("10", "--prompt-tokens")
    a = poisson(20.0, fixed, fixed, duration_s=200.0, count=None, seed=3)
    assert a == poisson(20.0, fixed, fixed, duration_s=200.0, count=None, seed=3)
    assert len(a) / 200.0 == pytest.approx(20.0, rel=0.05)
    assert all(0 < x.at_s < 200 for x in a)
    assert len(poisson(20.0, fixed, fixed, duration_s=None, count=17, seed=3)) == 17


def test_bursty_arrivals_are_silent_between_bursts_and_keep_the_mean_rate() -> None:
    fixed = parse_lengths("1", "x")
    a = bursty(10.0, 2.0, 8.0, fixed, fixed, duration_s=1000.0, count=None, seed=1)
    assert all(x.at_s % 10.0 < 2.0 for x in a)
    assert len(a) / 1000.0 == pytest.approx(10.0, rel=0.05)


def test_length_distributions() -> None:
    rng = random.Random(0)
    assert {parse_lengths("choice:16,512", "x")(rng) for _ in range(200)} == {16, 512}
    draws = [parse_lengths("uniform:5-7", "x")(rng) for _ in range(300)]
    assert min(draws) == 5 and max(draws) == 7
    for bad in (
        "0",
        "uniform:9-3",
        "choice:",
        "lots",
        "lognormal:0,1,512",
        "lognormal:64,-1,512",
        "lognormal:64,1",
        "lognormal:128,1,64",
        "lognormal:128,800,4096",
    ):
        with pytest.raises(
            ValueError, match=r"give N, uniform:A-B or choice:A,B,C .* lognormal:MEDIAN,SIGMA,MAX"
        ):
            parse_lengths(bad, "--output-tokens")


def test_lognormal_lengths_are_heavy_tailed_around_their_median_and_capped() -> None:
    rng = random.Random(0)
    draws = sorted(parse_lengths("lognormal:128,1.0,4096", "x")(rng) for _ in range(4000))
    assert draws[len(draws) // 2] == pytest.approx(128, rel=0.1)
    assert draws[int(0.99 * len(draws))] > 8 * 128, "the 99th percentile is ~10x the median (e^2.33)"
    capped = [parse_lengths("lognormal:128,2.0,300", "x")(rng) for _ in range(2000)]
    assert max(capped) == 300 and min(capped) >= 1
    wild = [parse_lengths("lognormal:128,10,4096", "x")(rng) for _ in range(2000)]  # no overflow
    assert max(wild) == 4096 and min(wild) == 1


def test_a_diurnal_day_is_quiet_at_its_ends_busy_in_its_middle_and_keeps_the_mean_rate() -> None:
    fixed = parse_lengths("1", "x")
    day = diurnal(10.0, fixed, fixed, duration_s=600.0, count=None, seed=2)
    assert day == diurnal(10.0, fixed, fixed, duration_s=600.0, count=None, seed=2)
    assert len(day) / 600.0 == pytest.approx(10.0, rel=0.05)
    # the first and last tenth of the day against the tenth around noon: the rate's mean there is
    # 10 × (1 ∓ ⅔ × the mean of cos(2πx) over them: 0.9355 and −0.9836), 3.76 and 16.56 req/s
    night_rate = sum(1 for a in day if a.at_s < 60.0 or a.at_s >= 540.0) / 120.0
    noon_rate = sum(1 for a in day if 270.0 <= a.at_s < 330.0) / 60.0
    assert night_rate == pytest.approx(3.76, rel=0.1)
    assert noon_rate == pytest.approx(16.56, rel=0.1)
    with pytest.raises(ValueError, match="needs --duration"):
        diurnal(10.0, fixed, fixed, duration_s=None, count=50, seed=2)


def test_a_trace_is_replayed_from_time_zero(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 105.5, "prompt_tokens": 9, "output_tokens": 3},
        {"timestamp": 100.0, "prompt_tokens": 1, "output_tokens": 2},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = read_trace(trace)
    assert [(x.at_s, x.prompt_tokens, x.output_tokens) for x in a] == [(0.0, 1, 2), (5.5, 9, 3)]
    trace.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:1: each line must be a JSON object"):
        read_trace(trace)


def test_the_bench_command_line_builds_a_diurnal_day_with_heavy_tailed_outputs() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    day_args = ["--arrivals", "diurnal", "--rate", "4", "--duration", "300", "--seed", "5"]
    args = parser.parse_args(["--url", "http://x", *day_args, "--output-tokens", "lognormal:64,1.2,2048"])
    fixed = parse_lengths("64", "x")
    heavy = parse_lengths("lognormal:64,1.2,2048", "x")
    day = diurnal(4.0, fixed, heavy, duration_s=300.0, count=None, seed=5)
    assert [(a.at_s, a.output_tokens) for a in build_arrivals(args)] == [
        (a.at_s, a.output_tokens) for a in day
    ]

"""The benchmark's arrivals are reproducible and have the rates and lengths asked for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ecobatch.tools.bench.workload import bursty, parse_lengths, poisson, read_trace


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
    for bad in ("0", "uniform:9-3", "choice:", "lots"):
        with pytest.raises(ValueError, match="give N, uniform:A-B or choice:A,B,C"):
            parse_lengths(bad, "--output-tokens")


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

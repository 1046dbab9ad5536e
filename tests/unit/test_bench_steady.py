"""`ecobatch bench --steady-s FROM:TO`: energy read inside the arrivals, without the start and the tail."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest

from ecobatch.energy.counters import CounterReading
from ecobatch.tools.bench import _steady_energy, _steady_window, _versus_first, add_arguments, run_cli


class RecordingReader:
    """A counter that grows by 1,000 J per read and records when it was read."""

    source = "test"
    gpu = "0"

    def __init__(self) -> None:
        self.read_at: list[float] = []

    async def read(self) -> CounterReading:
        self.read_at.append(time.monotonic())
        return {"0": 1000.0 * len(self.read_at)}

    async def power_w(self) -> float | None:
        return None


async def test_the_counter_is_read_at_from_and_to_after_the_start_and_the_joules_between_are_kept() -> None:
    reader = RecordingReader()
    started: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_steady_energy(reader, started, (0.05, 0.15)))
    await asyncio.sleep(0)
    assert reader.read_at == []  # nothing is read before the phase starts
    start = time.monotonic()
    started.set_result(start)
    steady = await task
    first, second = reader.read_at
    assert start + 0.05 <= first < start + 0.15 <= second
    assert steady == {"from_s": 0.05, "to_s": 0.15, "joules": 1000.0, "mean_power_w": pytest.approx(10_000.0)}


def test_the_window_is_from_colon_to_with_from_before_to() -> None:
    assert _steady_window("30:90") == (30.0, 90.0)
    for bad in ("90:30", "30", "-1:5", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="--steady-s"):
            _steady_window(bad)


def test_a_steady_window_past_the_energy_window_is_refused_naming_both() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--url", "http://x", "--duration", "10", "--steady-s", "5:30", "--window-s", "20"]
    args = parser.parse_args(argv)
    with pytest.raises(ValueError, match=r"--steady-s ends at 30\.0 s: give --window-s of at least"):
        run_cli(args)


def _summary(label: str, per_request_j: float, steady_w: float | None) -> dict[str, object]:
    energy: dict[str, object] = {"joules_per_request": per_request_j}
    if steady_w is not None:
        energy["steady"] = {"mean_power_w": steady_w}
    return {"label": label, "energy": energy}


def test_each_target_is_compared_with_the_first_on_both_measures_round_by_round() -> None:
    rounds = [
        [_summary("direct", 100.0, 400.0), _summary("ecobatch", 50.0, 160.0)],
        [_summary("direct", 100.0, 400.0), _summary("ecobatch", 60.0, 200.0)],
    ]
    ratios = _versus_first(rounds)["ecobatch"]
    assert ratios["joules_per_request"]["mean"] == pytest.approx(0.55)
    assert ratios["steady_mean_power"]["mean"] == pytest.approx(0.45)
    low, high = ratios["steady_mean_power"]["ci95_low"], ratios["steady_mean_power"]["ci95_high"]
    assert low is not None and high is not None and low < 0.4 < 0.5 < high
    one_round = _versus_first(rounds[:1])["ecobatch"]
    assert one_round["joules_per_request"]["ci95_low"] is None  # one round has no interval
    no_steady = [[_summary("a", 1.0, None), _summary("b", 1.0, None)]]
    assert "steady_mean_power" not in _versus_first(no_steady)["b"]

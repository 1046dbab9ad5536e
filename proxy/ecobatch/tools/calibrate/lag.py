"""How late the energy counter reports the energy: its lag, measured.

The ledger places each counter interval on the clock at the moments it was read. A counter that reports
energy ``L`` seconds after the GPU drew it moves every interval's joules ``L`` later than the work that
drew them: a short request's energy lands after it, on the requests running then (or on other work).
``energy.counter_lag_s`` (or the profile's ``counter_lag_s``) moves the intervals back by ``L``.

Measured with bursts of work on an idle GPU: each burst's power rises and falls; the counter's power
(its joules' slope, sampled every few milliseconds, placed when the counter moved) crosses half-way
between idle and the burst's level ``L`` after the burst started and ``L`` after it ended, where ``L``
is the counter's reporting delay plus half its step (how late a reading is on average: what the meter
undoes), the same at both edges. The power's own decay after work ends lengthens the falling edge's
delay: that energy is the work's too, so undoing it is right, but a rise much shorter than the fall is
the sign of it (both are reported). A burst's start is when its requests were sent and its end when the
last answer came: the engine's start-up delay lengthens the rising edge's delay by a few milliseconds and
the last answer's trip shortens the falling one's, so the median of both is the lag within that.
``lag_from_trace`` reads the delays off a trace; ``probe_counter_lag`` makes the bursts and records it.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from ...engines import upstream_http

__all__ = ["LagEstimate", "completion_bursts", "lag_from_trace", "probe_counter_lag"]

#: a burst whose power does not rise this much above idle (a fraction of it) shows no edges to time
_MIN_RISE = 0.05
#: the most lag a meter takes (``energy.counter_lag_s``'s bound)
_MAX_LAG_S = 5.0
#: (seconds on the monotonic clock, the counter's joules then)
Sample = tuple[float, float]


@dataclass(frozen=True, slots=True)
class LagEstimate:
    """The counter's lag (median of the edges' delays, seconds) and each edge's delay."""

    lag_s: float
    rise_delays_s: tuple[float, ...]
    fall_delays_s: tuple[float, ...]

    @property
    def meter_lag_s(self) -> float:
        """The lag as a meter takes it (``energy.counter_lag_s``, a profile's ``counter_lag_s``): within
        0-5 s (a start-up delay longer than the lag can read slightly negative)."""
        return min(max(self.lag_s, 0.0), _MAX_LAG_S)


def _power(trace: Sequence[Sample]) -> list[tuple[float, float]]:
    """(when the counter moved, the mean power over the step it ended): where the counter stood still
    between samples, its step is one longer step, not a zero then a spike. Placed at the move, not at the
    step's middle: a reading taken at any moment holds the energy up to the counter's last move, half a
    step earlier on average, and the meter must undo that too."""
    steps: list[tuple[float, float]] = []
    t0, e0 = trace[0]
    for t, e in trace[1:]:
        if e != e0 and t > t0:
            steps.append((t, (e - e0) / (t - t0)))
            t0, e0 = t, e
    return steps


def _crossing(
    steps: Sequence[tuple[float, float]], after_s: float, level_w: float, rising: bool
) -> float | None:
    """The first time after ``after_s`` at which the power crosses ``level_w`` (upwards if ``rising``),
    interpolated between the two steps around it."""
    previous: tuple[float, float] | None = None
    for t, p in steps:
        if t < after_s:
            previous = (t, p)
            continue
        if previous is not None:
            (ta, pa), (tb, pb) = previous, (t, p)
            crossed = pa < level_w <= pb if rising else pa > level_w >= pb
            if crossed:
                return ta + (tb - ta) * (level_w - pa) / (pb - pa)
        previous = (t, p)
    return None


def lag_from_trace(
    trace: Sequence[Sample], bursts: Sequence[tuple[float, float]], idle_w: float
) -> LagEstimate:
    """The counter's lag from ``trace`` around ``bursts`` ((start, end) of work on an otherwise idle GPU,
    apart by more than the lag): for each, the delay from its start to the power rising half-way to the
    burst's level, and from its end to the power falling half-way back to ``idle_w``."""
    if len(trace) < 3:
        raise ValueError(f"a trace of {len(trace)} samples: too short to see a lag")
    steps = _power(trace)
    rises, falls = [], []
    for start_s, end_s in bursts:
        inside = [p for t, p in steps if start_s + (end_s - start_s) / 2 <= t <= end_s]
        if not inside or statistics.median(inside) < idle_w * (1 + _MIN_RISE):
            continue  # no burst to see
        level = idle_w + (statistics.median(inside) - idle_w) / 2
        rise = _crossing(steps, start_s - 0.05, level, rising=True)
        fall = _crossing(steps, end_s - 0.05, level, rising=False)
        if rise is not None and fall is not None and rise < end_s + 1.0:
            rises.append(rise - start_s)
            falls.append(fall - end_s)
    if not rises:
        raise ValueError("no burst rose above idle in the trace: no lag measured")
    return LagEstimate(statistics.median(rises + falls), tuple(rises), tuple(falls))


class _Sampler:
    """The counter read every ``period_s`` in a thread (an event loop's timers are too coarse)."""

    def __init__(self, read: Callable[[], float], period_s: float) -> None:
        self._read, self._period_s = read, period_s
        self.trace: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counter-lag", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.trace.append((time.monotonic(), self._read()))
            self._stop.wait(self._period_s)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def probe_counter_lag(
    send_burst: Callable[[], Awaitable[object]],
    read_joules: Callable[[], float],
    idle_w: float,
    *,
    bursts: int = 5,
    gap_s: float = 2.0,
    period_s: float = 0.005,
) -> LagEstimate:
    """Run ``bursts`` bursts of work (``send_burst()``: an awaitable that ends when the burst's work is
    done), ``gap_s`` of idle before and after each, while the counter is sampled; the lag from the
    trace (``lag_from_trace``)."""
    windows: list[tuple[float, float]] = []
    with _Sampler(read_joules, period_s) as sampler:
        await asyncio.sleep(gap_s)
        for _ in range(bursts):
            start_s = time.monotonic()
            await send_burst()
            windows.append((start_s, time.monotonic()))
            await asyncio.sleep(gap_s)
    return lag_from_trace(sampler.trace, windows, idle_w)


def completion_bursts(
    http: aiohttp.ClientSession, url: str, body: Callable[[], dict[str, Any]], in_flight: int
) -> Callable[[], Awaitable[None]]:
    """A burst for ``probe_counter_lag``: ``in_flight`` completions (``body()`` each) sent at once to the
    server at ``url``, ended when all are answered; an answer other than 200 is an error naming it."""

    async def one() -> None:
        async with await upstream_http.post(http, f"{url}/v1/completions", body()) as r:
            if r.status != 200:
                raise RuntimeError(f"{url} answered {r.status}: {(await r.text())[:300]}")
            await r.read()

    async def burst() -> None:
        await asyncio.gather(*(one() for _ in range(in_flight)))

    return burst

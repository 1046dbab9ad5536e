"""Idle power, measured live: re-estimated from the counter whenever nothing runs on the GPU.

A GPU's idle draw is not a constant: it climbs as the card warms under load and falls as it cools (the
start-up readings of one H200 across runs: ``benchmarks/results/README.md``, "Net-of-idle figures";
the live estimate against the benchmark's: ``benchmarks/results/h200-energy-truth/``). Charged at a
start-up figure, the difference lands on every request (idle too low) or in the other-work bucket (too
high).

The ledger feeds every settled interval in which **nothing ran**: none of ecobatch's requests in
flight, none ended within the power's tail, and the engine reporting no other client's work. Quiet
time is gathered into windows of at least ``window_s``; the estimate is the **mean power over the
last ``windows`` windows that lie within ±``_BAND`` of their (low) median** (joules over seconds), and
it replaces the start-up figure once ``min_windows`` windows are in. Anything that is not quiet breaks the
window being gathered (its quiet part is dropped, not stretched over the gap).

Why the mean of the windows near the median, not the median itself: a burst of work ecobatch cannot see
lifts one window far above the rest, and the band drops it; but a counter moves in steps (NVML's on an
H200: one step every 100 ms), and a window's length is known only to within the meter's sampling
interval, so windows of ten ~0.1 s samples hold 10 steps most of the time and 11 now and then (or the
other way round): the median is then the common value, 3-4 % off in either direction, and every
request is charged the difference as its own or it lands in other work. On an H200 the live estimate
read 118.5 W and 118.7 W at the end of two runs (``run3/*/ecobatch-metrics.txt``) where the counter's
own trace read 122.8 W over the runs' quiet spans; replayed from that trace, windows sampled every
100-105 ms have a median of 117.6-127.7 W and a band mean of 122.6-122.9 W
(``benchmarks/results/h200-energy-truth/run3/*/idle-replay.json``). Within the band the steps average
out.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

__all__ = ["IdleEstimator", "band_mean_w"]

#: windows further than this fraction from their (low) median are taken for unseen work (or a counter
#: that stalled) and left out of the mean; a window of ten samples is off by one step at most (±10 %)
_BAND = 0.15


class IdleEstimator:
    def __init__(
        self, initial_w: float, *, window_s: float = 1.0, windows: int = 31, min_windows: int = 3
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"{window_s=} must be > 0")
        if not 1 <= min_windows <= windows:
            raise ValueError(f"{min_windows=} must be between 1 and {windows=}")
        self.power_w = initial_w
        self.window_s = window_s
        self._min_windows = min_windows
        self._windows: deque[tuple[float, float]] = deque(maxlen=windows)  # (joules, seconds)
        self._joules = 0.0
        self._seconds = 0.0
        #: windows gathered since start (the estimate is live once this reaches ``min_windows``)
        self.windows_seen = 0

    @property
    def live(self) -> bool:
        """Whether the estimate comes from quiet time measured while serving (else: the start-up one)."""
        return self.windows_seen >= self._min_windows

    def quiet(self, joules: float, seconds: float) -> None:
        """An interval of ``seconds`` in which nothing ran and the counter moved ``joules``."""
        if seconds <= 0:
            return
        self._joules += joules
        self._seconds += seconds
        if self._seconds >= self.window_s:
            self._windows.append((self._joules, self._seconds))
            self.windows_seen += 1
            self._joules = self._seconds = 0.0
            if self.live:
                self.power_w = band_mean_w(self._windows)

    def busy(self) -> None:
        """Something ran: the window being gathered is dropped."""
        self._joules = self._seconds = 0.0


def band_mean_w(windows: Iterable[tuple[float, float]]) -> float:
    """The mean power (Σ joules / Σ seconds) of the (joules, seconds) windows whose power lies within
    ±``_BAND`` of the windows' low median (a window's own power: never between two far-apart groups,
    and of the lower one, since work the engine does not report only ever adds power)."""
    powers = [(j / s, j, s) for j, s in windows if s > 0]
    if not powers:
        raise ValueError("band_mean_w needs at least one window with seconds > 0")
    median_w = statistics.median_low(p for p, _, _ in powers)
    kept = [(j, s) for p, j, s in powers if abs(p - median_w) <= _BAND * abs(median_w)]
    return sum(j for j, _ in kept) / sum(s for _, s in kept)  # the median's own window is always kept

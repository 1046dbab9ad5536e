"""Idle power, measured live: re-estimated from the counter whenever nothing runs on the GPU.

A GPU's idle draw is not a constant: it climbs as the card warms under load and falls as it cools (the
start-up readings of one H200 across runs: ``benchmarks/results/README.md``, "Net-of-idle figures";
the live estimate against the benchmark's: ``benchmarks/results/h200-energy-truth/``). Charged at a
start-up figure, the difference lands on every request (idle too low) or in the other-work bucket (too
high).

The ledger feeds every settled interval in which **nothing ran**: none of ecobatch's requests in
flight, none ended within the power's tail, and the engine reporting no other client's work. Quiet
time is gathered into windows of at least ``window_s``; the estimate is the **median** power of the
last ``windows`` windows (a burst of work ecobatch cannot see moves one window, not the median), and
it replaces the start-up figure once ``min_windows`` windows are in. Anything that is not quiet breaks
the window being gathered (its quiet part is dropped, not stretched over the gap).
"""

from __future__ import annotations

import statistics
from collections import deque

__all__ = ["IdleEstimator"]


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
        self._powers: deque[float] = deque(maxlen=windows)
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
            self._powers.append(self._joules / self._seconds)
            self.windows_seen += 1
            self._joules = self._seconds = 0.0
            if self.live:
                self.power_w = statistics.median(self._powers)

    def busy(self) -> None:
        """Something ran: the window being gathered is dropped."""
        self._joules = self._seconds = 0.0

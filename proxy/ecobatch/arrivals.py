"""Arrival-rate estimate for the adaptive window: an exponentially weighted mean of inter-arrival gaps.

Times are passed in (seconds on a monotonic clock), so tests drive it with a fake clock. When the
queue has been quiet for longer than the mean gap, the quiet time itself counts as the gap, so the
estimate falls during a lull instead of remembering the last burst.
"""

from __future__ import annotations

__all__ = ["ArrivalRate"]


class ArrivalRate:
    def __init__(self, smoothing: float = 0.2) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"{smoothing=} must be in (0, 1]")
        self._smoothing = smoothing
        self._last_s: float | None = None
        self._mean_gap_s: float | None = None

    def observe(self, t_s: float) -> None:
        """Record one arrival at time t_s."""
        if self._last_s is not None:
            gap = max(0.0, t_s - self._last_s)
            if self._mean_gap_s is None:
                self._mean_gap_s = gap
            else:
                self._mean_gap_s += self._smoothing * (gap - self._mean_gap_s)
        self._last_s = t_s

    def per_s(self, now_s: float) -> float:
        """Estimated arrivals per second at now_s (0 until two arrivals were seen)."""
        if self._last_s is None or self._mean_gap_s is None:
            return 0.0
        gap = max(self._mean_gap_s, now_s - self._last_s)
        return float("inf") if gap <= 0 else 1.0 / gap

"""Rate estimates on injected times: arrivals for the adaptive window (``ArrivalRate``, an exponentially
weighted mean of inter-arrival gaps) and completions for ``Retry-After`` (``RecentRate``, a sliding
window).

Times are passed in (seconds on a monotonic clock), so tests drive it with a fake clock. When the
queue has been quiet for longer than the mean gap, the quiet time itself counts as the gap, so the
estimate falls during a lull instead of remembering the last burst.
"""

from __future__ import annotations

from collections import deque

__all__ = ["ArrivalRate", "RecentRate"]


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


class RecentRate:
    """Events per second over the last ``window_s`` (completions, to say how fast a queue drains).

    Counted in buckets of ``bucket_s``, so memory stays constant at any rate. Bursty events (a static
    batch finishing at once) are averaged over the window rather than read as a burst then a lull.
    """

    def __init__(self, window_s: float = 10.0, bucket_s: float = 0.5) -> None:
        if not 0 < bucket_s <= window_s:
            raise ValueError(f"need 0 < {bucket_s=} <= {window_s=}")
        self._window_s, self._bucket_s = window_s, bucket_s
        self._buckets: deque[list[float]] = deque()  # [bucket start s, count]
        self._first_s: float | None = None

    def observe(self, t_s: float) -> None:
        if self._first_s is None:
            self._first_s = t_s
        start = t_s - t_s % self._bucket_s
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([start, 1.0])
        self._trim(t_s)

    def _trim(self, now_s: float) -> None:
        while self._buckets and self._buckets[0][0] < now_s - self._window_s:
            self._buckets.popleft()

    def per_s(self, now_s: float) -> float:
        """Events per second over the window (or since the first event, if that is shorter)."""
        self._trim(now_s)
        if self._first_s is None or not self._buckets:
            return 0.0
        span = min(self._window_s, max(now_s - self._first_s, self._bucket_s))
        return sum(count for _, count in self._buckets) / span

"""A circuit breaker for a remote engine: after ``threshold`` failures in a row the upstream is taken to
be down, and requests are answered 503 at once (with ``Retry-After``) instead of each waiting for its
own connection error or time-out; the first success (a health probe's, usually) closes it again, so the
proxy recovers without a restart."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import UpstreamDown
from .base import EngineHealth

__all__ = ["Breaker"]

log = logging.getLogger(__name__)


class Breaker:
    def __init__(self, upstream: str, threshold: int, clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1:
            raise ValueError(f"{threshold=} must be >= 1")
        self.upstream, self._threshold, self._clock = upstream, threshold, clock
        self._failures = 0
        self._down_since_s: float | None = None
        self.last_error: str | None = None

    @property
    def open(self) -> bool:
        return self._down_since_s is not None

    def failure(self, reason: str) -> None:
        self._failures += 1
        self.last_error = reason
        if self._failures >= self._threshold and self._down_since_s is None:
            self._down_since_s = self._clock()
            log.error(
                "upstream %s is down (%d failures in a row; last: %s)", self.upstream, self._failures, reason
            )

    def trip(self, reason: str) -> None:
        """Open now: the upstream refused the connection (nothing listens), no need to count to the
        threshold; the next probe that succeeds closes it again."""
        self._failures = max(self._failures, self._threshold - 1)
        self.failure(reason)

    def success(self) -> None:
        if self._down_since_s is not None:
            log.info("upstream %s is back after %.1f s", self.upstream, self._clock() - self._down_since_s)
        self._failures, self._down_since_s, self.last_error = 0, None, None

    def check(self) -> None:
        """Raise ``UpstreamDown`` while the breaker is open."""
        if self._down_since_s is not None:
            down_s = self._clock() - self._down_since_s
            raise UpstreamDown(
                f"upstream {self.upstream} is down (for {down_s:.0f} s; last error: {self.last_error}); "
                "retry later",
                retry_after_s=5.0,
            )

    def state(self) -> EngineHealth:
        down = self._down_since_s
        return EngineHealth(
            "down" if down is not None else "up",
            last_error=self.last_error,
            upstream=self.upstream,
            down_for_s=None if down is None else round(self._clock() - down, 1),
            failures_in_a_row=self._failures,
        )

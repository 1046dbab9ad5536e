"""The meter: a background sampler that turns an energy counter into intervals for the ledger.

Every ``sample_interval_s`` it reads the counter (``CounterReader``) and hands the joules since the
last reading to the ledger as one interval. NVML's counter updates only about every 100 ms and
dcgm-exporter's every collection interval, so an interval in which the counter stood still is
extended rather than closed (a zero there and a lump later would land on the wrong requests); after
``max_stale_s`` of a counter standing still the interval is closed with nothing in it and a warning.

Without a reader (``source="model"``) the meter closes an interval every tick with ``joules=None``
and the ledger fills in the profile's modelled joules.

Idle power (the idle bucket's rate) is measured at start, before any request: the counter's delta
over ``idle_probe_s`` where the counter moved, else the mean of power readings over that time; the
ledger then re-estimates it live from quiet intervals (``idle.py``). With each interval the meter passes
the sequences another client runs on the engine (``others_in_flight``, the engine's own count). The
GPUs' power limit, read with the first reading, caps what ecobatch's requests can be charged. The meter
hands both to the ledger through its methods (``set_idle_power``, ``adopt_power_limit``): the facts
flow one way, from the counter to the ledger. The ``gpu`` label of the series is the meter's own: the
replica's prefix and the names the reader gives its GPUs (``gpu``). A counter that reports energy late
(``counter_lag_s``, measured by ``calibrate/lag.py``) has its readings placed that much earlier, where
the energy was drawn.

A counter that cannot be read (an exporter down) is retried at every tick; a short outage costs
nothing, since the next reading's delta covers it. One that stays unreadable for ``max_stale_s``
becomes a **gap**: the requests in it settle flagged incomplete rather than waiting forever, and the
counter starts afresh once it can be read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections import deque
from collections.abc import Callable

from .counters import CounterDeltas, CounterReader
from .ledger import Ledger

__all__ = ["Meter"]

log = logging.getLogger(__name__)


#: the most a closing meter waits for a late counter's last energy (inside the server's cleanup bound)
_CLOSE_WAIT_S = 1.0
#: how many of the counter's latest steps its resolution is the median of
_STEPS = 31


def _none_running() -> float:
    return 0.0


class Meter:
    def __init__(
        self,
        ledger: Ledger,
        reader: CounterReader | None,
        *,
        sample_interval_s: float = 0.1,
        idle_power_w: float | None = None,
        idle_probe_s: float = 1.0,
        max_stale_s: float = 60.0,
        gpu_prefix: str = "",
        idle_fallback_w: float | None = None,
        counter_lag_s: float = 0.0,
        modelled_gpu: str = "modelled",
    ) -> None:
        if sample_interval_s <= 0:
            raise ValueError(f"{sample_interval_s=} must be > 0")
        if counter_lag_s < 0:
            raise ValueError(f"{counter_lag_s=} must be >= 0")
        #: how late the counter reports the energy: readings are placed this much earlier on the clock
        self.counter_lag_s = counter_lag_s
        self.ledger = ledger
        self.reader = reader
        self.sample_interval_s = sample_interval_s
        self._idle_power_w = idle_power_w
        self._idle_probe_s = idle_probe_s
        self._max_stale_s = max_stale_s
        self._deltas = CounterDeltas()
        self._last_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stale_warned = False
        self._gap_open = False  # the counter was lost: rebase at its next reading
        self._failing = False
        self._others_seen: deque[tuple[float, float]] = deque()  # (when, the other client's sequences)
        self._moved_at: float | None = None  # when the counter last moved
        self._steps: deque[float] = deque(maxlen=_STEPS)  # the times between its moves
        self._resolution_s: float | None = None
        self._named = False  # the GPUs have been named and their power limit read (first reading)
        #: put before the GPUs' name in the ``gpu`` label (a replica's name: "r1:")
        self.gpu_prefix = gpu_prefix
        self._modelled_gpu = modelled_gpu  # the label's name without a reader: the GPU the profile models
        #: idle power to charge when it cannot be measured at start-up (a replica still loading, or a
        #: counter that cannot be read): the profile's, announced; None: 0 W until restarted
        self.idle_fallback_w = idle_fallback_w
        #: called once the GPUs are named after a start-up without a counter (a late replica's check)
        self.on_named: Callable[[], None] | None = None
        #: sequences another client runs on the engine now (its own count; the replica that owns this
        #: meter says): their share of an interval is other work, and no interval with them is idle
        self.others_in_flight: Callable[[], float] = _none_running

    @property
    def readable(self) -> bool:
        """False while the counter cannot be read."""
        return not self._failing

    @property
    def named(self) -> bool:
        """True once the counter has been read: its GPUs are known (``reader.gpu``), read now or not."""
        return self._named

    @property
    def source(self) -> str:
        return self.ledger.source

    @property
    def gpu(self) -> str:
        """The ``gpu`` label of its series: the prefix, then the counter's names for its GPUs (a dcgm
        reader's own once it has been read: "dcgm" until then), or the GPU the profile models."""
        return self.gpu_prefix + (self.reader.gpu if self.reader is not None else self._modelled_gpu)

    async def start(self, *, measure_idle: bool = True) -> None:
        """Start sampling. ``measure_idle=False``: the engine is still loading (it draws more than idle),
        so the idle power is not probed: the configured one, else ``idle_fallback_w``."""
        if not measure_idle and self._idle_power_w is None and self.idle_fallback_w is not None:
            self._idle_power_w = self.idle_fallback_w
            log.info(
                "energy: %s is not up yet; its idle power is the profile's", self.gpu_prefix or "the engine"
            )
        if self.reader is not None:
            try:
                if self._idle_power_w is None:
                    self._idle_power_w = await self._probe_idle_power_w(self.reader)
                self._deltas.delta(await self.reader.read())
                self._name(self.reader)
            except Exception as exc:
                log.error(
                    "energy: cannot read the %s counter%s at start-up (%s); serving on, and requests settle "
                    "as incomplete until it can be read",
                    self.source,
                    f" of {self.gpu_prefix.rstrip(':')}" if self.gpu_prefix else "",
                    exc,
                )
                self._gap_open = self._failing = True
                if self._idle_power_w is None and self.idle_fallback_w is not None:
                    self._idle_power_w = self.idle_fallback_w
                    log.warning(
                        "energy: idle power %.1f W from the profile until restarted", self._idle_power_w
                    )
        if self._idle_power_w is not None:
            self.ledger.set_idle_power(self._idle_power_w)
        self._last_s = self._drawn_at()
        self._task = asyncio.create_task(self._run(), name="ecobatch-meter")

    def _name(self, reader: CounterReader) -> None:
        """A reader that has been read has named its GPUs (the ``gpu`` label) and knows their power
        limit, which the ledger takes as its cap (unless one was configured)."""
        self.ledger.adopt_power_limit(reader.max_power_w())
        late = self._task is not None  # named by sampling, not at start-up
        self._named = True
        if late and self.on_named is not None:
            self.on_named()

    async def close(self, *, last_reading: bool = True) -> None:
        """Stop sampling, close the last interval and settle everything (call after the dispatcher). A
        late counter (``counter_lag_s``) is given that long to report the last energy first (at most
        ``_CLOSE_WAIT_S``). ``last_reading=False``: a meter whose GPU never served (a replica refused
        while joining) reports nothing more."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if last_reading:
                if self.reader is not None and self.counter_lag_s > 0:
                    await asyncio.sleep(min(self.counter_lag_s + self.sample_interval_s, _CLOSE_WAIT_S))
                with contextlib.suppress(Exception):
                    await self.sample(force=True)
        self.ledger.flush()
        if self.reader is not None:
            await self.reader.close()

    async def _probe_idle_power_w(self, reader: CounterReader) -> float:
        clock = self.ledger.clock
        deltas = CounterDeltas()
        deltas.delta(await reader.read())
        t0 = clock.now()
        powers: list[float] = []
        while True:
            power = await reader.power_w()
            if power is not None:
                powers.append(power)
            if clock.now() - t0 >= self._idle_probe_s:
                break
            await asyncio.sleep(min(0.1, self._idle_probe_s))
        joules, seconds = deltas.delta(await reader.read()), clock.now() - t0
        if joules > 0 and seconds > 0:
            return joules / seconds
        return sum(powers) / len(powers) if powers else 0.0

    def _drawn_at(self) -> float:
        """When the energy the counter reports now was drawn: now, less the counter's lag."""
        return self.ledger.clock.now() - self.counter_lag_s

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval_s)
            try:
                await self.sample()
            except Exception:  # one bad interval must not stop the accounting for good
                log.exception("energy sampling failed; sampling on")

    def _lost(self, exc: BaseException) -> None:
        now = self._drawn_at()
        if not self._failing:
            log.warning("energy: reading the %s counter failed: %s (retrying)", self.source, exc)
            self._failing = True
        if now - self._last_s >= self._max_stale_s:
            if not self._gap_open:
                log.error(
                    "energy: the %s counter has been unreadable for %.0f s; requests in this time settle "
                    "as incomplete",
                    self.source,
                    now - self._last_s,
                )
            self.ledger.add_gap(self._last_s, now)
            self._last_s, self._gap_open = now, True

    def _others_while(self, t0_s: float, t1_s: float) -> float:
        """The most sequences another client ran while the energy of [t0_s, t1_s] was drawn: the readings
        taken then, or without one the latest before."""
        during = [n for t, n in self._others_seen if t0_s <= t <= t1_s]
        return max(during) if during else self._others_seen[0][1]

    def _moved(self, now_s: float) -> None:
        """The counter moved: the time since it last moved is one of its steps; the ledger's resolution
        is the median of the last ``_STEPS`` of them (at least the sampling interval). Unknown (no
        uncertainty on receipts) until the counter has been seen moving twice."""
        if self._moved_at is not None:
            self._steps.append(now_s - self._moved_at)
            resolution_s = max(self.sample_interval_s, statistics.median(self._steps))
            if resolution_s != self._resolution_s:
                self._resolution_s = resolution_s
                self.ledger.set_counter_resolution(resolution_s)
        self._moved_at = now_s

    async def sample(self, *, force: bool = False) -> None:
        """Read the counter and close an interval (unless the counter stood still and ``force`` is off)."""
        # the other client's sequences now: paired with the energy drawn now, which a late counter
        # reports only later (the interval it lands in is placed back where it was drawn)
        seen = self._others_seen
        seen.append((self.ledger.clock.now(), self.others_in_flight()))
        while len(seen) > 1 and seen[1][0] <= self._last_s:  # keep one from before the open interval
            seen.popleft()
        joules: float | None = None
        if self.reader is not None:
            try:
                reading = await self.reader.read()
            except Exception as exc:  # an unreadable counter must not stop the proxy
                self._lost(exc)
                return
            if self._failing:
                log.info("energy: the %s counter is readable again", self.source)
                self._failing = False
            if not self._named:  # first read after a start-up without a counter
                self._name(self.reader)
            if self._gap_open:  # what it counted during the gap cannot be placed: start afresh here
                self._deltas.rebase(reading)
                now = self._drawn_at()
                self.ledger.add_gap(self._last_s, now)
                self._last_s, self._gap_open = now, False
                return
            joules = self._deltas.delta(reading)
            if joules > 0:
                self._moved(self.ledger.clock.now())
        now = self._drawn_at()
        if joules == 0.0 and not force:
            if now - self._last_s < self._max_stale_s:
                return
            if not self._stale_warned:
                log.warning(
                    "energy: the %s counter has not moved for %.0f s; closing empty intervals",
                    self.source,
                    now - self._last_s,
                )
                self._stale_warned = True
        self.ledger.add_interval(self._last_s, now, joules, self._others_while(self._last_s, now))
        self._last_s = now

"""Measured energy: a background sampler of the GPUs' energy counters, with interval attribution.

NVML's ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded) is the truth, but it
updates only about every 100 ms, as long as a batching window, so it is read in the background every
``sample_interval_s`` (0.1–1 s), never around each batch. Each sampled interval's joules (summed over
the GPUs; reset-safe: a counter that goes backwards contributes nothing for that interval) are split:

1. **idle**: the part of the interval with no span active, charged at the idle power measured at
   start-up (never more than the interval's joules), goes to the idle bucket
   (``ecobatch_idle_energy_joules_total``);
2. **active**: the rest goes to the spans active in the interval, in proportion to
   overlap time × the span's sequences;
3. when a span ends and the sampler has passed its end, its joules are split among its requests by
   weighted tokens (``energy.split_by_tokens``: completion + prefill_weight × prompt tokens).

So Σ requests' joules + idle joules = Σ interval joules = the counter's delta (tested). Where a GPU
has no energy counter (pre-Volta), power readings are integrated instead (trapezoids); A100/H100 power
readings sample only ~25 % of the time, so that fallback is coarser and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .energy import BatchEnergy, Span, split_by_tokens
from .gpu import Gpu
from .openai_api import Usage

__all__ = ["IntervalTotals", "NvmlMeter"]

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Active:
    span: Span
    end_s: float | None = None
    joules: float = 0.0
    settled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class IntervalTotals:
    """Running sums since start-up, in joules."""

    counter_joules: float = 0.0
    idle_joules: float = 0.0
    active_joules: float = 0.0
    attributed_joules: float = 0.0


class NvmlMeter:
    source = "nvml"

    def __init__(
        self,
        gpus: Sequence[Gpu],
        *,
        prefill_weight: float,
        sample_interval_s: float = 0.1,
        idle_power_w: float | None = None,
        idle_probe_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not gpus:
            raise ValueError("NvmlMeter needs at least one GPU")
        if sample_interval_s <= 0:
            raise ValueError(f"{sample_interval_s=} must be > 0")
        self._gpus = list(gpus)
        self._prefill_weight = prefill_weight
        self.sample_interval_s = sample_interval_s
        self.idle_power_w = idle_power_w
        self._idle_probe_s = idle_probe_s
        self._clock = clock
        self.gpu = "+".join(str(g.facts.index) for g in self._gpus)
        self.totals = IntervalTotals()
        self._active: list[_Active] = []
        self._last_s = 0.0
        self._last_mj: list[int | None] = []
        self._last_mw: list[int] = []
        self._task: asyncio.Task[None] | None = None
        #: Called after every interval with (active_joules, idle_joules, interval_s).
        self.on_interval: Callable[[float, float, float], None] = lambda a, i, s: None
        missing = [g.facts.index for g in self._gpus if g.total_energy_mj() is None]
        if missing:
            log.warning(
                "GPUs %s have no energy counter: integrating power readings instead (coarser)", missing
            )

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.idle_power_w is None:
            self.idle_power_w = await self._probe_idle_power_w()
        log.info(
            "energy: NVML meter on GPU %s, idle power %.1f W, sampling every %.2f s",
            self.gpu,
            self.idle_power_w,
            self.sample_interval_s,
        )
        self._read_baseline()
        self._task = asyncio.create_task(self._run(), name="nvml-sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        for a in self._active:
            a.settled.set()

    async def _probe_idle_power_w(self) -> float:
        readings = []
        end = self._clock() + self._idle_probe_s
        while True:
            readings.append(sum(g.power_mw() for g in self._gpus) / 1000.0)
            if self._clock() >= end:
                break
            await asyncio.sleep(0.05)
        return sum(readings) / len(readings)

    def _read_baseline(self) -> None:
        self._last_s = self._clock()
        self._last_mj = [g.total_energy_mj() for g in self._gpus]
        self._last_mw = [g.power_mw() for g in self._gpus]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval_s)
            self.sample()

    # ---- sampling and attribution --------------------------------------------------------------
    def _interval_joules(self, dt_s: float) -> float:
        total = 0.0
        for i, g in enumerate(self._gpus):
            mj = g.total_energy_mj()
            mw = g.power_mw()
            if mj is not None and self._last_mj[i] is not None:
                prev = self._last_mj[i]
                assert prev is not None
                if mj >= prev:
                    total += (mj - prev) / 1000.0
                else:
                    log.warning("GPU %d energy counter went backwards (driver reload?): interval skipped", i)
            else:
                total += (mw + self._last_mw[i]) / 2000.0 * dt_s
            self._last_mj[i], self._last_mw[i] = mj, mw
        return total

    def sample(self) -> None:
        """Read the counters and attribute the interval since the last sample (called by the sampler)."""
        now = self._clock()
        t0, dt = self._last_s, now - self._last_s
        joules = self._interval_joules(dt)
        self._last_s = now
        self.totals.counter_joules += joules
        weights = []
        covered: list[tuple[float, float]] = []
        for a in self._active:
            lo, hi = max(t0, a.span.start_s), min(now, a.end_s if a.end_s is not None else now)
            overlap = max(0.0, hi - lo)
            weights.append(overlap * a.span.concurrency)
            if overlap > 0:
                covered.append((lo, hi))
        busy = _union_length(covered)
        total_weight = sum(weights)
        idle = joules if total_weight <= 0 else min(joules, (self.idle_power_w or 0.0) * max(0.0, dt - busy))
        active = joules - idle
        if total_weight > 0:
            for a, w in zip(self._active, weights, strict=True):
                a.joules += active * w / total_weight
        self.totals.idle_joules += idle
        self.totals.active_joules += active
        self.on_interval(active, idle, dt)
        still = []
        for a in self._active:
            if a.end_s is not None and a.end_s <= now:
                a.settled.set()
            else:
                still.append(a)
        self._active = still

    # ---- spans ---------------------------------------------------------------------------------
    def begin(self, concurrency: int) -> Span:
        span = Span(start_s=self._clock(), concurrency=max(1, concurrency))
        self._active.append(_Active(span))
        return span

    async def end(self, span: Span, usages: Sequence[Usage]) -> BatchEnergy:
        """Close the span; return once a sample past its end has settled its joules."""
        active = next((a for a in self._active if a.span is span), None)
        if active is None:
            raise ValueError("end() for a span this meter did not begin (or ended twice)")
        active.end_s = self._clock()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(active.settled.wait(), timeout=10 * self.sample_interval_s + 1.0)
        if not active.settled.is_set():  # the sampler is gone: settle now
            self.sample()
        shares = split_by_tokens(active.joules, usages, self._prefill_weight)
        self.totals.attributed_joules += sum(shares) if usages else 0.0
        return BatchEnergy(
            source=self.source,
            gpu=self.gpu,
            total_joules=active.joules,
            per_request_joules=tuple(shares),
            duration_s=active.end_s - span.start_s,
        )


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total

"""Cumulative energy counters, read per GPU, and reset-safe deltas between readings.

A reader returns a ``CounterReading``: joules since some origin (driver load, boot), one entry per GPU.
``CounterDeltas`` turns successive readings into the joules spent between them: a GPU whose counter
went backwards (driver reload, exporter restart) or that appears for the first time contributes
nothing for that interval, and a GPU missing from one reading is skipped, not zeroed.

Readers: ``NvmlCounters`` (this host's GPUs through NVML, ``source="nvml"``) here, and
``DcgmCounters`` (a dcgm-exporter endpoint, ``source="dcgm"``) in ``dcgm.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from .gpu import Gpu

__all__ = ["CounterDeltas", "CounterReader", "CounterReading", "NvmlCounters"]

log = logging.getLogger(__name__)

CounterReading = Mapping[str, float]


class CounterReader(Protocol):
    #: "nvml" or "dcgm": the ``source`` label of every series this reader feeds.
    source: str
    #: GPU label for metrics ("0", "0+1").
    gpu: str

    async def read(self) -> CounterReading:
        """Cumulative joules per GPU, now."""
        ...

    async def power_w(self) -> float | None:
        """Board power summed over the GPUs, now (None where unknown); used to probe idle power."""
        ...

    def max_power_w(self) -> float | None:
        """The GPUs' summed power limit, as last read (None where unknown)."""
        ...

    async def close(self) -> None: ...


class CounterDeltas:
    """Joules between successive readings, per GPU, reset-safe."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def rebase(self, reading: CounterReading) -> None:
        """Forget the past: the next delta counts from ``reading``."""
        self._last = dict(reading)

    def delta(self, reading: CounterReading) -> float:
        total = 0.0
        for key, value in reading.items():
            last = self._last.get(key)
            if last is not None:
                if value >= last:
                    total += value - last
                else:
                    log.warning("energy counter of GPU %s went backwards (reset?): interval skipped", key)
            self._last[key] = value
        return total


class NvmlCounters:
    """This host's GPUs through NVML's total-energy counter (mJ since the driver loaded, Volta+).

    A GPU without the counter (pre-Volta) gets a virtual one: its power readings integrated with
    trapezoids at every read, coarser (A100/H100 power readings sample ~25 % of the time), and logged.
    """

    source = "nvml"

    def __init__(self, gpus: Sequence[Gpu], clock: Callable[[], float] = time.monotonic) -> None:
        if not gpus:
            raise ValueError("NvmlCounters needs at least one GPU")
        self.gpus = list(gpus)
        self.gpu = "+".join(str(g.facts.index) for g in self.gpus)
        self._clock = clock
        self._integrated: dict[int, tuple[float, float, float]] = {}  # index -> (t_s, power_w, joules)
        missing = [g.facts.index for g in self.gpus if g.total_energy_mj() is None]
        if missing:
            log.warning(
                "GPUs %s have no energy counter: integrating power readings instead (coarser)", missing
            )

    def read_now(self) -> dict[str, float]:
        """The reading, synchronously (NVML calls take microseconds to a millisecond)."""
        out: dict[str, float] = {}
        for g in self.gpus:
            mj = g.total_energy_mj()
            index = g.facts.index
            if mj is not None:
                out[str(index)] = mj / 1000.0
                continue
            now, power = self._clock(), g.power_mw() / 1000.0
            t, p, joules = self._integrated.get(index, (now, power, 0.0))
            joules += (p + power) / 2.0 * (now - t)
            self._integrated[index] = (now, power, joules)
            out[str(index)] = joules
        return out

    async def read(self) -> CounterReading:
        return await asyncio.to_thread(self.read_now)

    def power_now_w(self) -> float:
        return sum(g.power_mw() for g in self.gpus) / 1000.0

    def max_power_w(self) -> float | None:
        limits = [g.facts.power_limit_w for g in self.gpus]
        return None if any(limit is None for limit in limits) else sum(x for x in limits if x is not None)

    async def power_w(self) -> float | None:
        return await asyncio.to_thread(self.power_now_w)

    async def close(self) -> None:
        return None

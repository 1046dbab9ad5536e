"""Measurement for calibration: an energy window over the NVML counters the meter reads.

``EnergyWindow`` reads the same per-GPU counters as the serving meter (``energy.counters``:
``NvmlCounters`` with reset-safe ``CounterDeltas``) at its start and end, and samples board power and
utilization in a thread in between (peak power, mean utilization).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...energy.counters import CounterDeltas, NvmlCounters
from ...energy.gpu import Gpu

__all__ = ["EnergyWindow", "measure_idle_power_w"]


class _PowerSampler:
    """Samples board power and utilization in a thread while a measurement runs."""

    def __init__(self, gpus: Sequence[Gpu], interval_s: float = 0.05) -> None:
        self._gpus, self._interval_s = gpus, interval_s
        self.power_w: list[float] = []
        self.util_pct: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.power_w.append(sum(g.power_mw() for g in self._gpus) / 1000.0)
            self.util_pct.append(sum(g.utilization_pct() for g in self._gpus) / len(self._gpus))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> _PowerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(slots=True)
class EnergyWindow:
    """A timed window: seconds, joules (the counters' delta) and power/utilization samples over it."""

    counters: NvmlCounters
    seconds: float = 0.0
    joules: float = 0.0
    peak_power_w: float = 0.0
    util_pct: float = 0.0
    _sampler: _PowerSampler | None = None
    _deltas: CounterDeltas = field(default_factory=CounterDeltas)
    _t0: float = 0.0

    def __enter__(self) -> EnergyWindow:
        self._sampler = _PowerSampler(self.counters.gpus).__enter__()
        self._deltas.delta(self.counters.read_now())
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.joules = self._deltas.delta(self.counters.read_now())
        self.seconds = time.monotonic() - self._t0
        assert self._sampler is not None
        self._sampler.__exit__()
        self.peak_power_w = max(self._sampler.power_w, default=0.0)
        self.util_pct = sum(self._sampler.util_pct) / max(len(self._sampler.util_pct), 1)


def measure_idle_power_w(gpus: Sequence[Gpu], seconds: float = 3.0) -> float:
    with _PowerSampler(gpus) as sampler:
        time.sleep(seconds)
    return sum(sampler.power_w) / max(len(sampler.power_w), 1)

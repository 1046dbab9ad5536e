"""Energy read where the GPU is: a dcgm-exporter (or any Prometheus exposition) endpoint.

For a remote vLLM the proxy's host has no GPU, or the wrong one. dcgm-exporter, run beside the engine,
exports ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ since boot, one series per GPU),
``DCGM_FI_DEV_POWER_USAGE`` (W) and, where its counters file lists it, ``DCGM_FI_DEV_POWER_MGMT_LIMIT``
(W). ``DcgmCounters`` scrapes the endpoint, keeps the series whose labels
match ``energy.dcgm_labels`` (and whose ``gpu`` label is in ``energy.gpu_indices`` when that is set),
and returns one cumulative reading per GPU, in joules. Attribution and reset handling are the same as
for NVML (``counters.CounterDeltas``, ``ledger``).

dcgm-exporter refreshes its values every collection interval (``-c``, milliseconds; 30 s by default).
The meter scrapes often (every 0.1 s by default) and extends an interval while the counter stands
still, so each interval ends within one scrape of the exporter's update; only the lines of the fields
above are parsed, so frequent scrapes stay cheap. Run the exporter with ``-c 1000`` or less for
per-second resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from ..exposition import samples
from .counters import CounterReading

__all__ = [
    "DCGM_ENERGY_METRIC",
    "DCGM_POWER_LIMIT_METRIC",
    "DCGM_POWER_METRIC",
    "DcgmCounters",
    "DcgmReading",
    "DcgmUnavailable",
    "parse_dcgm",
]

log = logging.getLogger(__name__)

DCGM_ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
DCGM_POWER_METRIC = "DCGM_FI_DEV_POWER_USAGE"
DCGM_POWER_LIMIT_METRIC = "DCGM_FI_DEV_POWER_MGMT_LIMIT"


@dataclass(frozen=True, slots=True)
class DcgmReading:
    energy_joules: dict[str, float]
    power_w: float | None
    power_limit_w: float | None


class DcgmUnavailable(RuntimeError):
    """The endpoint could not be read, or it exports no matching energy series."""


def _series_key(labels: Mapping[str, str]) -> str:
    host = labels.get("Hostname") or labels.get("instance") or ""
    gpu = labels.get("gpu") or labels.get("UUID") or ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{host}/{gpu}" if host else gpu


def parse_dcgm(
    text: str,
    *,
    energy_metric: str = DCGM_ENERGY_METRIC,
    labels: Mapping[str, str] | None = None,
    gpu_indices: Sequence[int] | None = None,
) -> DcgmReading:
    """Joules per selected GPU series, and their summed power and power limit (None where not
    exported), from exposition text."""
    names = (energy_metric, DCGM_POWER_METRIC, DCGM_POWER_LIMIT_METRIC)
    wanted_gpus = {str(i) for i in gpu_indices} if gpu_indices is not None else None

    def selected(sample_labels: Mapping[str, str]) -> bool:
        if any(sample_labels.get(k) != v for k, v in (labels or {}).items()):
            return False
        return wanted_gpus is None or sample_labels.get("gpu") in wanted_gpus

    energy: dict[str, float] = {}
    gauges: dict[str, list[float]] = {DCGM_POWER_METRIC: [], DCGM_POWER_LIMIT_METRIC: []}
    for name, sample in samples(text, names):
        if not selected(sample.labels):
            continue
        if name == energy_metric:
            energy[_series_key(sample.labels)] = sample.value / 1000.0
        else:
            gauges[name].append(sample.value)
    power, limit = gauges[DCGM_POWER_METRIC], gauges[DCGM_POWER_LIMIT_METRIC]
    return DcgmReading(
        energy, sum(power) if power else None, sum(limit) if len(limit) == len(energy) and limit else None
    )


class DcgmCounters:
    source = "dcgm"

    def __init__(
        self,
        url: str,
        *,
        labels: Mapping[str, str] | None = None,
        gpu_indices: Sequence[int] | None = None,
        energy_metric: str = DCGM_ENERGY_METRIC,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self._labels = dict(labels or {})
        self._gpu_indices = list(gpu_indices) if gpu_indices is not None else None
        self._energy_metric = energy_metric
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._power_limit_w: float | None = None
        self.gpu = "dcgm"

    async def _scrape(self) -> DcgmReading:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(self.url) as resp:
                if resp.status != 200:
                    raise DcgmUnavailable(f"energy.dcgm_url={self.url} answered HTTP {resp.status}")
                text = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise DcgmUnavailable(f"energy.dcgm_url={self.url} cannot be read: {exc!r}") from exc
        reading = parse_dcgm(
            text, energy_metric=self._energy_metric, labels=self._labels, gpu_indices=self._gpu_indices
        )
        if not reading.energy_joules:
            raise DcgmUnavailable(
                f"energy.dcgm_url={self.url} exports no {self._energy_metric} series matching "
                f"labels={self._labels} gpu_indices={self._gpu_indices}"
            )
        self._power_limit_w = reading.power_limit_w
        return reading

    async def read(self) -> CounterReading:
        energy = (await self._scrape()).energy_joules
        if self.gpu == "dcgm":  # name the GPUs once, from the first reading
            self.gpu = "+".join(sorted(energy))
            if len(energy) > 1 and not self._labels and self._gpu_indices is None:
                log.warning(
                    "energy: dcgm-exporter at %s exports %d GPUs (%s) and neither energy.dcgm_labels nor "
                    "energy.gpu_indices is set: all of them are counted as the engine's",
                    self.url,
                    len(energy),
                    self.gpu,
                )
        return energy

    async def power_w(self) -> float | None:
        return (await self._scrape()).power_w

    def max_power_w(self) -> float | None:
        return self._power_limit_w

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

"""Energy read where the GPU is: a dcgm-exporter (or any Prometheus exposition) endpoint.

For a remote vLLM the proxy's host has no GPU, or the wrong one. dcgm-exporter, run beside the engine,
exports ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ since boot, one series per GPU) and
``DCGM_FI_DEV_POWER_USAGE`` (W). ``DcgmCounters`` scrapes the endpoint, keeps the series whose labels
match ``energy.dcgm_labels`` (and whose ``gpu`` label is in ``energy.gpu_indices`` when that is set),
and returns one cumulative reading per GPU, in joules. Attribution and reset handling are the same as
for NVML (``counters.CounterDeltas``, ``ledger``).

dcgm-exporter refreshes its values every collection interval (``-c``, milliseconds; 30 s by default):
the meter extends an interval while the counter stands still, so a coarse interval only delays
settlement; run the exporter with ``-c 1000`` or less for per-second resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .counters import CounterReading

__all__ = ["DCGM_ENERGY_METRIC", "DCGM_POWER_METRIC", "DcgmCounters", "DcgmUnavailable", "parse_dcgm"]

DCGM_ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
DCGM_POWER_METRIC = "DCGM_FI_DEV_POWER_USAGE"


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
    power_metric: str = DCGM_POWER_METRIC,
    labels: Mapping[str, str] | None = None,
    gpu_indices: Sequence[int] | None = None,
) -> tuple[dict[str, float], float | None]:
    """(joules per GPU series, power in W summed over them or None) from exposition text."""
    wanted_gpus = {str(i) for i in gpu_indices} if gpu_indices is not None else None

    def selected(sample_labels: Mapping[str, str]) -> bool:
        if any(sample_labels.get(k) != v for k, v in (labels or {}).items()):
            return False
        return wanted_gpus is None or sample_labels.get("gpu") in wanted_gpus

    energy: dict[str, float] = {}
    power: list[float] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # a counter declared without "_total" comes back from the parser with it
            name = sample.name.removesuffix("_total") if family.type == "counter" else sample.name
            if name not in (energy_metric, power_metric) or not selected(sample.labels):
                continue
            if name == energy_metric:
                energy[_series_key(sample.labels)] = sample.value / 1000.0
            else:
                power.append(sample.value)
    return energy, (sum(power) if power else None)


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
        self.gpu = "dcgm"

    async def _scrape(self) -> tuple[dict[str, float], float | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(self.url) as resp:
                if resp.status != 200:
                    raise DcgmUnavailable(f"energy.dcgm_url={self.url} answered HTTP {resp.status}")
                text = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise DcgmUnavailable(f"energy.dcgm_url={self.url} cannot be read: {exc!r}") from exc
        energy, power = parse_dcgm(
            text, energy_metric=self._energy_metric, labels=self._labels, gpu_indices=self._gpu_indices
        )
        if not energy:
            raise DcgmUnavailable(
                f"energy.dcgm_url={self.url} exports no {self._energy_metric} series matching "
                f"labels={self._labels} gpu_indices={self._gpu_indices}"
            )
        return energy, power

    async def read(self) -> CounterReading:
        energy, _ = await self._scrape()
        if self.gpu == "dcgm":  # name the GPUs once, from the first reading
            self.gpu = "+".join(sorted(energy))
        return energy

    async def power_w(self) -> float | None:
        _, power = await self._scrape()
        return power

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

"""NVIDIA GPUs through NVML, behind a small interface with a test double.

Like Zeus' GPU classes: code above this module never asks "is there a GPU?". ``discover_gpus`` returns
NVML devices, or an empty list when NVML (or a GPU) is missing, and the energy module decides what that
means (it announces the modelled meter; it never exports a silent zero). ``FakeGpu`` is a scripted
device for tests on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FakeGpu", "Gpu", "GpuFacts", "NvmlGpu", "discover_gpus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuFacts:
    index: int
    name: str
    driver: str
    power_limit_w: float | None


class Gpu(Protocol):
    facts: GpuFacts

    def total_energy_mj(self) -> int | None:
        """Energy since the driver loaded, in millijoules; None where the counter is missing."""
        ...

    def power_mw(self) -> int:
        """Instantaneous board power, in milliwatts."""
        ...

    def utilization_pct(self) -> float:
        """Share of the last sample period in which a kernel ran (NVML's coarse "GPU utilization")."""
        ...


class NvmlGpu:
    """One GPU through nvidia-ml-py (pynvml). The energy counter needs Volta or newer."""

    def __init__(self, index: int) -> None:
        import pynvml

        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self._handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        try:
            limit_w: float | None = pynvml.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1000.0
        except pynvml.NVMLError:
            limit_w = None
        self.facts = GpuFacts(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            driver=driver.decode() if isinstance(driver, bytes) else str(driver),
            power_limit_w=limit_w,
        )
        self._has_counter = True
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except pynvml.NVMLError:
            self._has_counter = False

    def total_energy_mj(self) -> int | None:
        if not self._has_counter:
            return None
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def power_mw(self) -> int:
        return int(self._nvml.nvmlDeviceGetPowerUsage(self._handle))

    def utilization_pct(self) -> float:
        return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)


class FakeGpu:
    """A scripted GPU: tests set ``energy_mj`` / ``power`` and advance them."""

    def __init__(self, index: int = 0, *, energy_mj: int | None = 0, power_w: float = 100.0) -> None:
        self.facts = GpuFacts(index, "Fake GPU", "test", 700.0)
        self.energy_mj = energy_mj
        self.power_w = power_w
        self.util_pct = 0.0

    def total_energy_mj(self) -> int | None:
        return self.energy_mj

    def power_mw(self) -> int:
        return int(self.power_w * 1000)

    def utilization_pct(self) -> float:
        return self.util_pct


def _visible_indices(count: int) -> list[int]:
    """NVML numbers all GPUs; honour CUDA_VISIBLE_DEVICES when it lists plain indices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return list(range(count))
    out = []
    for part in visible.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            out.append(int(part))
    return out


def discover_gpus(indices: Sequence[int] | None = None) -> list[Gpu]:
    """NVML devices for ``indices`` (None: those CUDA_VISIBLE_DEVICES allows); [] without NVML or GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # no driver, no library, no device: all mean "no GPU" here
        log.info("NVML unavailable: %s", exc)
        return []
    chosen = list(indices) if indices is not None else _visible_indices(count)
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        from .errors import ConfigError

        raise ConfigError(f"energy.gpu_indices={list(chosen)}: index {bad[0]} is not one of the {count} GPUs")
    return [NvmlGpu(i) for i in chosen]

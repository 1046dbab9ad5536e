"""What a benchmark ran on, recorded beside its figures: the code (ecobatch's version and git commit) and
each GPU's state (NVML: name, driver, enforced power limit, SM and memory clocks, temperature), read at
the start and the end of every round. A comparison whose GPUs ran hotter, slower or under another power
limit in one round than in another says so in its own file.

Nothing here changes a setting: it only reads.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

from ... import __version__

__all__ = ["code", "gpu_states"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_states(nvml_module: ModuleType | None = None) -> list[dict[str, Any]]:
    """Each GPU NVML sees, now; ``[]`` where there is no GPU or no NVML. A reading NVML refuses for one
    GPU is ``None`` (not every GPU reports every clock). ``nvml_module``: pynvml, or a stand-in."""
    nvml: Any = nvml_module
    if nvml is None:
        try:
            import pynvml

            nvml = pynvml
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except Exception:  # NVML present, no driver or no GPU
        return []

    def read(call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except Exception:
            return None

    states = []
    driver = read(nvml.nvmlSystemGetDriverVersion)
    for index in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        limit_mw = read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        states.append(
            {
                "index": index,
                "name": _text(read(nvml.nvmlDeviceGetName, handle)),
                "driver": None if driver is None else _text(driver),
                "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
                "sm_clock_mhz": read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
                "memory_clock_mhz": read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
                "temperature_c": read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            }
        )
    return states


def _commit() -> str | None:
    """The git commit of the checkout ecobatch runs from (None: an installed wheel, or no git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def code() -> dict[str, Any]:
    """What ran: ecobatch's version and commit, and Python's."""
    return {"ecobatch": __version__, "commit": _commit(), "python": platform.python_version()}

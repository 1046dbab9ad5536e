"""What a benchmark ran on: the code and each GPU's state, read (never set) through NVML."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ecobatch.tools.bench.conditions import code, gpu_states


class NvmlError(Exception):
    pass


def fake_nvml(temperatures: list[int], refuse_memory_clock: bool = False) -> Any:
    """A pynvml of ``len(temperatures)`` GPUs (H200s at 700 W, SM 1,980 MHz)."""

    def clock(handle: int, which: str) -> int:
        if which == "mem" and refuse_memory_clock:
            raise NvmlError("not supported")
        return 1980 if which == "sm" else 3201

    return SimpleNamespace(
        NVML_CLOCK_SM="sm",
        NVML_CLOCK_MEM="mem",
        NVML_TEMPERATURE_GPU="gpu",
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: len(temperatures),
        nvmlSystemGetDriverVersion=lambda: b"580.95.05",
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetClockInfo=clock,
        nvmlDeviceGetTemperature=lambda h, sensor: temperatures[h],
    )


def test_each_gpus_clocks_temperature_and_power_limit_are_recorded() -> None:
    states = gpu_states(fake_nvml([41, 57]))
    assert [s["temperature_c"] for s in states] == [41, 57]
    assert states[0] == {
        "index": 0,
        "name": "NVIDIA H200",
        "driver": "580.95.05",
        "power_limit_w": 700.0,
        "sm_clock_mhz": 1980,
        "memory_clock_mhz": 3201,
        "temperature_c": 41,
    }


def test_a_reading_the_gpu_refuses_is_none_and_the_others_are_kept() -> None:
    (state,) = gpu_states(fake_nvml([50], refuse_memory_clock=True))
    assert state["memory_clock_mhz"] is None and state["sm_clock_mhz"] == 1980


def test_no_gpu_is_an_empty_list() -> None:
    def no_driver() -> None:
        raise NvmlError("driver not loaded")

    assert gpu_states(SimpleNamespace(nvmlInit=no_driver)) == []  # type: ignore[arg-type]


def test_the_code_is_named_by_version_and_commit() -> None:
    ran = code()
    assert ran["ecobatch"] and ran["python"]
    assert ran["commit"] is None or len(ran["commit"]) == 40

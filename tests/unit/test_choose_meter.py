"""Which energy source measures the engine: never this host's GPU for a remote upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ecobatch.clock import FakeClock
from ecobatch.config import load_settings
from ecobatch.energy.choose import MeterSpec, build_meter
from ecobatch.energy.gpu import FakeGpu
from ecobatch.errors import ConfigError
from ecobatch.profile import EnergyProfile, load_profile


def source_for(profile: EnergyProfile, gpus: list[Any], **overrides: object) -> str:
    spec = MeterSpec(load_settings(None, overrides))
    meter = build_meter(spec, profile, clock=FakeClock(), find_gpus=lambda: gpus)
    return meter.source


def test_auto_never_measures_this_hosts_gpu_for_a_remote_upstream(continuous_profile: EnergyProfile) -> None:
    remote = {"backend.kind": "vllm-http", "backend.upstream": "http://gpu-node:8000"}
    assert source_for(continuous_profile, [FakeGpu()], **remote) == "model"
    local = {"backend.kind": "vllm-http", "backend.upstream": "http://127.0.0.1:8000"}
    assert source_for(continuous_profile, [FakeGpu()], **local) == "nvml"
    assert source_for(continuous_profile, [], **local) == "model"


def test_auto_reads_dcgm_where_its_url_is_set(continuous_profile: EnergyProfile) -> None:
    remote = {
        "backend.kind": "vllm-http",
        "backend.upstream": "http://gpu-node:8000",
        "energy.dcgm_url": "http://gpu-node:9400/metrics",
    }
    assert source_for(continuous_profile, [FakeGpu()], **remote) == "dcgm"


def test_the_simulated_backend_is_modelled_and_an_explicit_nvml_needs_a_gpu(
    reference_profile: EnergyProfile,
) -> None:
    assert source_for(reference_profile, [FakeGpu()]) == "model"
    with pytest.raises(ConfigError, match=r"energy.meter=.nvml. but NVML found no GPU"):
        source_for(reference_profile, [], **{"energy.meter": "nvml"})
    assert source_for(reference_profile, [FakeGpu()], **{"energy.meter": "nvml"}) == "nvml"


def test_a_measured_meter_places_prompts_by_the_profiles_prefill_rate(
    continuous_profile: EnergyProfile,
) -> None:
    local = load_settings(None, {"backend.kind": "vllm-http", "backend.upstream": "http://127.0.0.1:8000"})
    calibrated = load_profile(Path(__file__).parents[2] / "configs/profiles/h200-vllm-mistral7b-bf16.yaml")
    meter = build_meter(MeterSpec(local), calibrated, clock=FakeClock(), find_gpus=lambda: [FakeGpu()])
    assert meter.ledger.prefill_tokens_per_s == pytest.approx(41_760.85, abs=0.01)
    assert continuous_profile.prefill_tokens_per_s is None
    meter = build_meter(
        MeterSpec(local), continuous_profile, clock=FakeClock(), find_gpus=lambda: [FakeGpu()]
    )
    assert meter.ledger.prefill_tokens_per_s is None

"""Which energy source measures the engine, and why: said once at start-up.

``energy.meter``:

* ``dcgm``: dcgm-exporter on the GPU host (``energy.dcgm_url``); right for a remote vLLM.
* ``nvml``: this host's GPUs. Right when the engine runs here (in-process, or a vLLM server on
  loopback); with a remote upstream it is the user's explicit claim and is logged as such.
* ``model``: the profile's modelled joules, ``source="model"``.
* ``auto``: dcgm where ``energy.dcgm_url`` is set; else NVML where the engine runs on this host and
  NVML finds a GPU; else modelled. ``auto`` never measures this host's GPUs for a remote upstream: a
  proxy must not call its own GPU the engine's.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from ..clock import Clock
from ..config import Settings
from ..errors import ConfigError
from ..profile import EnergyProfile
from .counters import CounterReader, NvmlCounters
from .dcgm import DcgmCounters
from .gpu import Gpu, discover_gpus
from .ledger import Ledger, LedgerReports, PrefillWeight
from .marginal import MarginalModel
from .meter import Meter
from .model import ProfileModel

__all__ = ["MeterSpec", "build_meter", "engine_is_local"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """What one meter measures: the settings as its engine sees them (a replica's own GPUs and upstream),
    the prefix of its ``gpu`` label (a replica's name), and the idle power to charge where it cannot be
    measured at start-up (the profile's)."""

    settings: Settings
    gpu_prefix: str = ""
    idle_fallback_w: float | None = None


def engine_is_local(settings: Settings) -> bool:
    """True when the engine's GPUs are this host's: in-process engines, or an upstream on loopback."""
    if settings.backend.kind != "vllm-http":
        return True
    host = urlparse(settings.backend.upstream).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _choose(settings: Settings, find_gpus: Callable[[], Sequence[Gpu]]) -> tuple[CounterReader | None, str]:
    energy, backend = settings.energy, settings.backend
    if energy.meter == "model":
        return None, "energy.meter=model"
    if energy.meter == "dcgm" or (energy.meter == "auto" and energy.dcgm_url):
        assert energy.dcgm_url is not None
        reader = DcgmCounters(energy.dcgm_url, labels=energy.dcgm_labels, gpu_indices=energy.gpu_indices)
        return reader, f"dcgm-exporter at energy.dcgm_url={energy.dcgm_url}, on the GPU's own host"
    local = engine_is_local(settings)
    if energy.meter == "auto" and backend.kind == "simulated":
        return None, "the simulated backend runs on no GPU"
    if energy.meter == "auto" and not local:
        return None, (
            f"backend.upstream={backend.upstream} is another host and energy.dcgm_url is not set; this "
            "host's GPUs are not the engine's. Set energy.dcgm_url to measure the engine's GPU"
        )
    gpus = find_gpus()
    if not gpus:
        if energy.meter == "nvml":
            raise ConfigError("energy.meter='nvml' but NVML found no GPU on this host", field="energy.meter")
        return None, "NVML found no GPU on this host"
    why = (
        "the engine runs on this host"
        if local
        else (
            f"energy.meter=nvml although backend.upstream={backend.upstream} is another host: this host's "
            "GPUs are taken to be the engine's"
        )
    )
    return NvmlCounters(gpus), f"NVML on GPU {'+'.join(str(g.facts.index) for g in gpus)}: {why}"


def prefill_weight(profile: EnergyProfile, fallback: float) -> float | PrefillWeight:
    """The profile's measured prefill / decode energy ratio at a concurrency, where it has both (and
    the configured constant at a concurrency it cannot say)."""
    if profile.prefill_weight(1.0) is None:
        return fallback

    def weight(concurrency: float) -> float:
        measured = profile.prefill_weight(max(1.0, concurrency))
        return fallback if measured is None else measured

    return weight


def build_meter(
    spec: MeterSpec,
    profile: EnergyProfile,
    *,
    clock: Clock,
    reports: LedgerReports | None = None,
    find_gpus: Callable[[], Sequence[Gpu]] | None = None,
) -> Meter:
    """The ledger and its meter for ``spec`` (not started), the ledger reporting to ``reports`` (its
    energy account's), with the choice logged."""
    settings = spec.settings
    energy = settings.energy
    reader, why = _choose(settings, find_gpus or (lambda: discover_gpus(energy.gpu_indices)))
    weight = prefill_weight(profile, energy.prefill_weight)
    if reader is None:
        model = ProfileModel(profile)
        ledger = Ledger(
            source="model",
            prefill_weight=weight,
            idle_power_w=model.idle_power_w,
            clock=clock,
            active_model=model.active_joules,
            marginal=MarginalModel.of(profile),
            reports=reports,
        )
        log.warning(
            'energy: MODELLED from profile %r (%s), exported with source="model": %s',
            profile.name,
            profile.source,
            why,
        )
        return Meter(
            ledger,
            None,
            sample_interval_s=energy.sample_interval_s,
            gpu_prefix=spec.gpu_prefix,
            modelled_gpu=model.gpu,
        )
    ledger = Ledger(
        source=reader.source,
        prefill_weight=weight,
        max_power_w=energy.max_power_w,
        clock=clock,
        tail_s=energy.tail_s,
        live_idle=energy.live_idle and energy.idle_power_w is None,
        prefill_tokens_per_s=profile.prefill_tokens_per_s,
        marginal=MarginalModel.of(profile),
        reports=reports,
    )
    lag_s = energy.counter_lag_s
    if lag_s is None:  # the profile's was measured through NVML (calibrate): another counter lags otherwise
        lag_s = (profile.counter_lag_s or 0.0) if reader.source == "nvml" else 0.0
        if profile.counter_lag_s and reader.source != "nvml":
            log.warning(
                "energy: the profile's counter_lag_s was measured through NVML, not %s: not applied "
                "(set energy.counter_lag_s for this counter)",
                reader.source,
            )
    rate = ledger.prefill_tokens_per_s
    prompts = (
        "at each request's start (the profile has no prefill rate)"
        if rate is None
        else (f"by a prefill queue at {rate:,.0f} prompt tokens/s (the profile's)")
    )
    log.info(
        "energy: measured by %s (counter lag %.0f ms); non-streamed prompts placed %s",
        why,
        1000 * lag_s,
        prompts,
    )
    return Meter(
        ledger,
        reader,
        sample_interval_s=energy.sample_interval_s,
        idle_power_w=energy.idle_power_w,
        max_stale_s=60.0,
        gpu_prefix=spec.gpu_prefix,
        idle_fallback_w=spec.idle_fallback_w,
        counter_lag_s=lag_s,
    )

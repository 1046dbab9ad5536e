"""Energy meters and the attribution of a span's joules to the requests in it.

A meter measures a *span* (one dispatched batch, from ``begin`` to ``end``) and returns a
``BatchEnergy`` whose per-request joules add up to the span's total. Two sources:

* ``ModelledMeter`` (``source="model"``): joules = the profile's J/token at the span's concurrency ×
  the generated tokens the engine reported. A model, labelled as one everywhere it is exported; used
  where no GPU energy counter can be read (the simulated backend, CPU machines).
* The NVML meter (``source="nvml"``, next issue) reads the GPU's total-energy counter in a background
  sampler and splits each sampled interval among the spans active in it; it plugs in behind the same
  ``EnergyMeter`` protocol.

Attribution rule (``split_by_tokens``): a span's joules are shared in proportion to each request's
weighted tokens, ``completion_tokens + prefill_weight × prompt_tokens``; if no request processed a
token the joules are shared equally. The shares always sum to the total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .openai_api import Usage
from .profile import EnergyProfile

__all__ = ["BatchEnergy", "EnergyMeter", "ModelledMeter", "Span", "split_by_tokens"]


@dataclass(frozen=True, slots=True)
class Span:
    start_s: float
    concurrency: int


@dataclass(frozen=True, slots=True)
class BatchEnergy:
    source: str
    gpu: str
    total_joules: float
    per_request_joules: tuple[float, ...]
    duration_s: float

    @property
    def mean_power_w(self) -> float | None:
        return self.total_joules / self.duration_s if self.duration_s > 0 else None


class EnergyMeter(Protocol):
    #: "nvml" (measured) or "model" (from a profile).
    source: str
    #: GPU label for metrics ("0", "0+1", or the profile's GPU name when modelled).
    gpu: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def begin(self, concurrency: int) -> Span: ...

    async def end(self, span: Span, usages: Sequence[Usage]) -> BatchEnergy: ...


def split_by_tokens(total_joules: float, usages: Sequence[Usage], prefill_weight: float) -> list[float]:
    """Share ``total_joules`` among requests by weighted tokens; the shares sum to the total."""
    if not usages:
        return []
    weights = [u.completion_tokens + prefill_weight * u.prompt_tokens for u in usages]
    total_weight = sum(weights)
    if total_weight <= 0:
        weights, total_weight = [1.0] * len(usages), float(len(usages))
    shares = [total_joules * w / total_weight for w in weights]
    shares[-1] = total_joules - sum(shares[:-1])  # exact sum despite rounding
    return shares


class ModelledMeter:
    """Joules from the energy profile, not from hardware (``source="model"``)."""

    source = "model"

    def __init__(
        self,
        profile: EnergyProfile,
        prefill_weight: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._profile = profile
        self._prefill_weight = prefill_weight
        self._clock = clock
        self.gpu = f"{profile.gpu} (modelled)"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def begin(self, concurrency: int) -> Span:
        return Span(start_s=self._clock(), concurrency=max(1, concurrency))

    async def end(self, span: Span, usages: Sequence[Usage]) -> BatchEnergy:
        joules_per_token = self._profile.at(span.concurrency).joules_per_token
        total = joules_per_token * sum(u.completion_tokens for u in usages)
        return BatchEnergy(
            source=self.source,
            gpu=self.gpu,
            total_joules=total,
            per_request_joules=tuple(split_by_tokens(total, usages, self._prefill_weight)),
            duration_s=max(0.0, self._clock() - span.start_s),
        )

"""Modelled energy (``source="model"``): joules from the profile where no counter can be read.

Used with the simulated backend, and wherever no GPU counter is reachable (announced at start-up and
exported with ``source="model"``, so a modelled figure never passes for a measured one). In an interval
the model charges the profile's idle power for the idle time and, for the busy time, the profile's
J/token at the interval's mean concurrency (batch size for static engines, sequences in flight for
continuous ones) × the tokens generated in it. The ledger splits those joules like measured ones.
"""

from __future__ import annotations

from ..profile import EnergyProfile

__all__ = ["ProfileModel"]


class ProfileModel:
    def __init__(self, profile: EnergyProfile) -> None:
        self.profile = profile
        self.idle_power_w = profile.idle_power_w or 0.0
        self.gpu = f"{profile.gpu} (modelled)"

    def active_joules(self, generated_tokens: float, concurrency: float) -> float:
        if generated_tokens <= 0:
            return 0.0
        return self.profile.at(max(concurrency, 1.0)).joules_per_token * generated_tokens

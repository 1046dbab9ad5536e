"""Engines behind one small protocol (``base.Backend``) and the factory that builds one from settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings
    from ..profile import EnergyProfile
    from .base import Backend

__all__ = ["create_backend"]


def create_backend(settings: Settings, profile: EnergyProfile) -> Backend:
    """Build the configured backend. Engine imports happen here, so a proxy that fronts a remote vLLM
    does not need torch or vllm installed."""
    kind = settings.backend.kind
    if kind == "simulated":
        from .simulated import SimulatedBackend

        return SimulatedBackend(profile, settings.backend, settings.batching)
    if kind == "vllm-http":
        from .vllm_http import VllmHttpBackend

        return VllmHttpBackend(settings.backend)
    if kind == "vllm-async":
        from .vllm_async import VllmAsyncBackend

        return VllmAsyncBackend(settings.backend)
    if kind == "hf-bnb":
        from .hf_bnb import HfBnbBackend

        return HfBnbBackend(settings.backend, settings.batching)
    raise ConfigError(f"backend.kind={kind!r} is not available in this build")

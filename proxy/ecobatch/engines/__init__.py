"""Engines behind two small contracts (``base.StaticEngine``, ``base.ContinuousEngine``) and the factory
that builds one from settings."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings
    from ..profile import EnergyProfile
    from .base import ContinuousEngine, StaticEngine

__all__ = ["create_continuous_engine", "create_static_engine"]

#: what each in-process engine imports, and the extra that installs it
_NEEDS = {
    "vllm-async": (("vllm", "transformers"), "ecobatch[vllm]"),
    "hf-bnb": (("torch", "transformers"), "ecobatch[hf]"),
}


def _check_installed(kind: str) -> None:
    modules, extra = _NEEDS.get(kind, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"backend.kind={kind!r} needs {', '.join(missing)}, not installed here: "
            f"pip install '{extra}' (or `pip install -e '.[{extra[9:-1]}]'` in a checkout)",
            field="backend.kind",
        )


def _missing(kind: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"backend.kind={kind!r} needs {exc.name or 'a package'} that is not installed: "
        f"pip install '{_NEEDS[kind][1] if kind in _NEEDS else 'ecobatch'}'",
        field="backend.kind",
    )


def create_static_engine(settings: Settings, profile: EnergyProfile) -> StaticEngine:
    """The configured static engine (``simulated``, ``hf-bnb``). Engine imports happen here, so a proxy
    that fronts a remote vLLM needs neither torch nor vllm installed."""
    kind = settings.backend.kind
    _check_installed(kind)
    try:
        if kind == "simulated":
            from .simulated import SimulatedBackend

            return SimulatedBackend(profile, settings.backend, settings.batching)
        if kind == "hf-bnb":
            from .hf_bnb import HfBnbBackend

            return HfBnbBackend(settings.backend, settings.batching)
    except ImportError as exc:
        raise _missing(kind, exc) from None
    raise ConfigError(f"backend.kind={kind!r} is not a static engine", field="backend.kind")


def create_continuous_engine(settings: Settings) -> ContinuousEngine:
    """The configured continuous engine (``vllm-http`` on ``backend.upstream``, ``vllm-async``); an
    in-process engine whose packages are missing is refused with the extra that installs them."""
    kind = settings.backend.kind
    _check_installed(kind)
    try:
        if kind == "vllm-http":
            from .vllm_http import VllmHttpBackend

            return VllmHttpBackend(settings.backend)
        if kind == "vllm-async":
            from .vllm_async import VllmAsyncBackend

            return VllmAsyncBackend(settings.backend)
    except ImportError as exc:
        raise _missing(kind, exc) from None
    raise ConfigError(f"backend.kind={kind!r} is not a continuous engine", field="backend.kind")

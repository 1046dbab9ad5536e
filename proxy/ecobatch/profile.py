"""Energy profiles: how tokens/s and joules/token change with batch size on one GPU + model.

A profile is a list of measured (or reference) points. Between points, values are interpolated
linearly in log2(batch size), which matches how these curves are measured (powers of two) and never
invents a shape the data does not show (ML.ENERGY: interpolate, don't fit). Outside the measured range
the nearest point is used, flat. ``fit_power_law`` reports the exponent of J/token ∝ BS^-α for
comparison with the seed's stated α ≈ 0.78; the policy never uses the fit.

YAML format (see configs/profiles/)::

    name: h200-mistral7b-int8
    source: measured          # measured | reference | modelled
    gpu: NVIDIA H200
    model: Mistral-7B
    idle_power_w: 122.0       # optional
    points:
      - batch_size: 1
        tokens_per_s: 14.7
        joules_per_token: 9.78      # or joules_per_1k_tokens: 9778
        power_w: 143.7              # optional; default joules_per_token * tokens_per_s
        peak_vram_bytes: 7.6e9      # optional
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

__all__ = ["EnergyProfile", "ProfilePoint", "ProfileSource", "fit_power_law", "load_profile"]

ProfileSource = Literal["measured", "reference", "modelled"]
_SOURCES: tuple[str, ...] = ("measured", "reference", "modelled")
_POINT_KEYS = {
    "batch_size",
    "tokens_per_s",
    "joules_per_token",
    "joules_per_1k_tokens",
    "power_w",
    "peak_vram_bytes",
}
_META_KEYS = {"name", "source", "gpu", "model", "quantization", "engine", "idle_power_w", "points", "meta"}


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    batch_size: float
    tokens_per_s: float
    joules_per_token: float
    power_w: float
    peak_vram_bytes: float | None = None

    @property
    def step_s(self) -> float:
        """Seconds per decode step: each of the batch's sequences gains one token per step."""
        return self.batch_size / self.tokens_per_s

    @property
    def joules_per_1k_tokens(self) -> float:
        return self.joules_per_token * 1000.0


@dataclass(frozen=True, slots=True)
class EnergyProfile:
    name: str
    source: ProfileSource
    points: tuple[ProfilePoint, ...]
    gpu: str = "unknown"
    model: str = "unknown"
    quantization: str | None = None
    engine: str | None = None
    idle_power_w: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.points:
            raise ConfigError(f"profile {self.name!r}: points must hold at least one point")
        sizes = [p.batch_size for p in self.points]
        if sizes != sorted(set(sizes)):
            raise ConfigError(f"profile {self.name!r}: batch_size values must be distinct and ascending")
        if self.source not in _SOURCES:
            raise ConfigError(f"profile {self.name!r}: source={self.source!r} must be one of {_SOURCES}")

    @property
    def max_batch_size(self) -> int:
        return int(self.points[-1].batch_size)

    def at(self, batch_size: float) -> ProfilePoint:
        """The profile at ``batch_size``: interpolated in log2(batch size), clamped at the ends."""
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        sizes = [p.batch_size for p in self.points]
        if batch_size <= sizes[0]:
            return _rescaled(self.points[0], batch_size)
        if batch_size >= sizes[-1]:
            return _rescaled(self.points[-1], batch_size)
        hi = bisect.bisect_left(sizes, batch_size)
        a, b = self.points[hi - 1], self.points[hi]
        if b.batch_size == batch_size:
            return b
        t = (math.log2(batch_size) - math.log2(a.batch_size)) / (
            math.log2(b.batch_size) - math.log2(a.batch_size)
        )

        def lerp(x: float, y: float) -> float:
            return x + (y - x) * t

        vram = (
            lerp(a.peak_vram_bytes, b.peak_vram_bytes)
            if a.peak_vram_bytes is not None and b.peak_vram_bytes is not None
            else None
        )
        return ProfilePoint(
            batch_size=batch_size,
            tokens_per_s=lerp(a.tokens_per_s, b.tokens_per_s),
            joules_per_token=lerp(a.joules_per_token, b.joules_per_token),
            power_w=lerp(a.power_w, b.power_w),
            peak_vram_bytes=vram,
        )


def _rescaled(edge: ProfilePoint, batch_size: float) -> ProfilePoint:
    """Outside the measured range: same step time, J/token and power as the nearest point."""
    if edge.batch_size == batch_size:
        return edge
    tokens_per_s = edge.tokens_per_s * batch_size / edge.batch_size
    return ProfilePoint(batch_size, tokens_per_s, edge.joules_per_token, edge.power_w, edge.peak_vram_bytes)


def fit_power_law(points: Sequence[ProfilePoint]) -> tuple[float, float]:
    """Least-squares fit of J/token = C · BS^-α on log-log axes; returns (C, α)."""
    if len(points) < 2:
        raise ValueError("fit_power_law needs at least two points")
    xs = [math.log(p.batch_size) for p in points]
    ys = [math.log(p.joules_per_token) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return math.exp(my - slope * mx), -slope


def _number(where: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}={value!r} must be a finite number")
    if value <= 0:
        raise ConfigError(f"{where}.{key}={value!r} must be > 0")
    return float(value)


def _point(where: str, raw: Mapping[str, Any]) -> ProfilePoint:
    unknown = sorted(k for k in raw if k not in _POINT_KEYS and not k.startswith(("seed_", "measured_")))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a point field; known: {sorted(_POINT_KEYS)}")
    for required in ("batch_size", "tokens_per_s"):
        if required not in raw:
            raise ConfigError(f"{where}.{required} is missing")
    if ("joules_per_token" in raw) == ("joules_per_1k_tokens" in raw):
        raise ConfigError(f"{where}: give exactly one of joules_per_token or joules_per_1k_tokens")
    bs = _number(where, "batch_size", raw["batch_size"])
    tps = _number(where, "tokens_per_s", raw["tokens_per_s"])
    if "joules_per_token" in raw:
        jpt = _number(where, "joules_per_token", raw["joules_per_token"])
    else:
        jpt = _number(where, "joules_per_1k_tokens", raw["joules_per_1k_tokens"]) / 1000.0
    power = _number(where, "power_w", raw["power_w"]) if "power_w" in raw else jpt * tps
    vram = _number(where, "peak_vram_bytes", raw["peak_vram_bytes"]) if "peak_vram_bytes" in raw else None
    return ProfilePoint(bs, tps, jpt, power, vram)


def profile_from_mapping(data: Mapping[str, Any], where: str = "profile") -> EnergyProfile:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping with name, source and points")
    unknown = sorted(set(data) - _META_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a profile field; known: {sorted(_META_KEYS)}")
    raw_points = data.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise ConfigError(f"{where}.points must be a non-empty list")
    points = sorted(
        (_point(f"{where}.points[{i}]", p) for i, p in enumerate(raw_points)), key=lambda p: p.batch_size
    )
    idle = data.get("idle_power_w")
    return EnergyProfile(
        name=str(data.get("name", where)),
        source=data.get("source", "reference"),
        points=tuple(points),
        gpu=str(data.get("gpu", "unknown")),
        model=str(data.get("model", "unknown")),
        quantization=data.get("quantization"),
        engine=data.get("engine"),
        idle_power_w=None if idle is None else _number(where, "idle_power_w", idle),
        meta=dict(data.get("meta") or {}),
    )


def load_profile(path: str | Path) -> EnergyProfile:
    """Load and validate a profile YAML file; errors name the file and the field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"energy.profile={str(p)!r}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return profile_from_mapping(data, where=str(p))

"""Energy profiles: how tokens/s and joules/token change with batch size (or concurrency) on one GPU.

Two kinds, because engines come in two shapes:

* ``kind: static``: points per **batch size**, for engines that run one padded batch at a time (HF
  generate, the simulated backend): the GPU batch is what the proxy sends.
* ``kind: continuous``: points per **concurrency** (sequences in flight), for engines that batch in
  flight (vLLM), as ``ecobatch calibrate --backend vllm-http`` measures them with a closed loop.

Either way a point's ``size`` is the number of sequences the GPU steps together, its ``tokens_per_s``
the total generated tokens per second, so per-sequence speed is tokens_per_s / size. Between points,
values are interpolated linearly in log2(size), which matches how these curves are measured (powers of
two) and never invents a shape the data does not show (ML.ENERGY: interpolate, don't fit). Outside the
measured range the nearest point is used, flat. ``fit_power_law`` reports the exponent of J/token ∝
size^-α for comparison with the seed's stated α ≈ 0.78; the policy never uses the fit.

YAML format (see configs/profiles/)::

    name: h200-mistral7b-int8
    kind: static              # static (batch_size points) | continuous (concurrency points)
    source: measured          # measured | reference | modelled
    gpu: NVIDIA H200
    model: Mistral-7B
    idle_power_w: 122.0       # optional
    points:
      - batch_size: 1               # continuous profiles: concurrency: 1
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

import msgspec
import yaml

from .errors import ConfigError

__all__ = [
    "EnergyProfile",
    "ProfileKind",
    "ProfilePoint",
    "ProfileSource",
    "fit_power_law",
    "load_profile",
    "profile_from_mapping",
]

ProfileSource = Literal["measured", "reference", "modelled"]
ProfileKind = Literal["static", "continuous"]
_SOURCES: tuple[str, ...] = ("measured", "reference", "modelled")
_KINDS: tuple[str, ...] = ("static", "continuous")
#: the YAML key that holds a point's size, by profile kind
SIZE_KEY: dict[str, str] = {"static": "batch_size", "continuous": "concurrency"}
_POINT_KEYS = {
    "tokens_per_s",
    "joules_per_token",
    "joules_per_1k_tokens",
    "power_w",
    "peak_vram_bytes",
}
_META_KEYS = {
    "name",
    "kind",
    "source",
    "gpu",
    "model",
    "quantization",
    "engine",
    "idle_power_w",
    "prefill_joules_per_token",
    "counter_lag_s",
    "points",
    "meta",
}


class ProfilePoint(msgspec.Struct, frozen=True):
    #: sequences stepped together: the batch size (static) or the sequences in flight (continuous)
    size: float
    tokens_per_s: float
    joules_per_token: float
    power_w: float
    peak_vram_bytes: float | None = None

    @property
    def step_s(self) -> float:
        """Seconds per decode step: each of the ``size`` sequences gains one token per step."""
        return self.size / self.tokens_per_s

    @property
    def joules_per_1k_tokens(self) -> float:
        return self.joules_per_token * 1000.0


_WHOLE_SIZES_CACHED = 4096


@dataclass(frozen=True, slots=True)
class EnergyProfile:
    name: str
    source: ProfileSource
    points: tuple[ProfilePoint, ...]
    kind: ProfileKind = "static"
    gpu: str = "unknown"
    model: str = "unknown"
    quantization: str | None = None
    engine: str | None = None
    idle_power_w: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: measured energy above idle per prompt token (``ecobatch calibrate``'s prefill point); None: not
    #: measured
    prefill_joules_per_token: float | None = None
    #: how late the energy counter reported the energy, seconds (``ecobatch calibrate``); None: not
    #: measured
    counter_lag_s: float | None = None
    # Points at whole sizes, computed once: the policy asks for every size up to its cap per decision.
    _at_whole: dict[int, ProfilePoint] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _curve: list[tuple[float, ...]] = field(
        default_factory=list, init=False, repr=False, compare=False, hash=False
    )
    # The points' sizes and their log2, for interpolating between them (a request's mean concurrency)
    _sizes: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False, hash=False)
    _log2_sizes: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise ConfigError(f"profile {self.name!r}: points must hold at least one point")
        sizes = [p.size for p in self.points]
        if sizes != sorted(set(sizes)):
            raise ConfigError(f"profile {self.name!r}: point sizes must be distinct and ascending")
        if self.source not in _SOURCES:
            raise ConfigError(f"profile {self.name!r}: source={self.source!r} must be one of {_SOURCES}")
        if self.kind not in _KINDS:
            raise ConfigError(f"profile {self.name!r}: kind={self.kind!r} must be one of {_KINDS}")
        object.__setattr__(self, "_sizes", tuple(sizes))
        object.__setattr__(self, "_log2_sizes", tuple(math.log2(size) for size in sizes))

    @property
    def max_size(self) -> int:
        """The largest measured batch size (static) or concurrency (continuous)."""
        return int(self.points[-1].size)

    @property
    def size_key(self) -> str:
        return SIZE_KEY[self.kind]

    def joules_per_token_curve(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """J/token at sizes 1 … max_size (index 0 is size 1), and its running minimum. Computed once."""
        if not self._curve:
            curve = tuple(self.at(size).joules_per_token for size in range(1, max(1, self.max_size) + 1))
            running: list[float] = []
            for joules in curve:
                running.append(min(joules, running[-1]) if running else joules)
            self._curve.extend([curve, tuple(running)])
        return self._curve[0], self._curve[1]

    def decode_joules_per_token(self, size: float) -> float | None:
        """Energy above idle per generated token at ``size`` (None without an idle power). A continuous
        profile's points were measured with prompts (``meta.prompt_tokens`` per ``meta.new_tokens``
        generated): with a measured prefill energy, their prompts' share is taken out."""
        if self.idle_power_w is None:
            return None
        # within the measured range: beyond it ``at`` scales speed with size at flat power, which would
        # make a token ever cheaper
        point = self.at(min(max(size, self.points[0].size), self.points[-1].size))
        joules = (point.power_w - self.idle_power_w) / point.tokens_per_s
        prompt, new = self.meta.get("prompt_tokens"), self.meta.get("new_tokens")
        measured = self.prefill_joules_per_token
        if measured is not None and isinstance(prompt, int) and isinstance(new, int) and new > 0:
            joules -= measured * prompt / new
        return joules if joules > 0 else None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """The prefill point's prompt tokens per second (``meta.prefill.prompt_tokens_per_s``, written by
        ``ecobatch calibrate``): how fast the engine works through prompts. None: not measured."""
        return self._prefill_number("prompt_tokens_per_s")

    @property
    def prefill_concurrency(self) -> float | None:
        """The requests in flight at the prefill point (``meta.prefill.concurrency``). None: not measured."""
        return self._prefill_number("concurrency")

    def _prefill_number(self, key: str) -> float | None:
        """``meta.prefill[key]`` where it is a finite number > 0 (not a bool), else None."""
        prefill = self.meta.get("prefill")
        value = prefill.get(key) if isinstance(prefill, Mapping) else None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            return None
        return float(value)

    def prefill_weight(self, size: float) -> float | None:
        """A prompt token's energy above idle against a generated token's at ``size`` (None: unknown)."""
        decode = self.decode_joules_per_token(size)
        if self.prefill_joules_per_token is None or decode is None:
            return None
        return self.prefill_joules_per_token / decode

    def power_above_idle_w(self, sequences: float) -> float:
        """The GPU's power above idle with ``sequences`` in flight, by the measured points (interpolated
        in log2, flat beyond the last); below the first point, that point's in proportion (0 at 0): the
        curve ``energy.marginal`` models a request's added energy with. Needs the profile's idle power."""
        if self.idle_power_w is None:
            raise ValueError(f"profile {self.name!r} has no idle_power_w: no power above idle to read")
        if sequences <= 0:
            return 0.0
        first = self.points[0]
        if sequences < first.size:
            return max(0.0, first.power_w - self.idle_power_w) * sequences / first.size
        return max(0.0, self.at(sequences).power_w - self.idle_power_w)

    def at(self, size: float) -> ProfilePoint:
        """The profile at ``size``: interpolated in log2(size), clamped at the ends."""
        if 0 < size <= _WHOLE_SIZES_CACHED and size == int(size):
            whole = int(size)
            point = self._at_whole.get(whole)
            if point is None:
                point = self._at_whole[whole] = self._interpolated(whole)
            return point
        return self._interpolated(size)

    def _interpolated(self, size: float) -> ProfilePoint:
        if size <= 0:
            raise ValueError(f"size={size} must be > 0")
        sizes, log2_sizes = self._sizes, self._log2_sizes
        if size <= sizes[0]:
            return _rescaled(self.points[0], size)
        if size >= sizes[-1]:
            return _rescaled(self.points[-1], size)
        hi = bisect.bisect_left(sizes, size)
        a, b = self.points[hi - 1], self.points[hi]
        if b.size == size:
            return b
        t = (math.log2(size) - log2_sizes[hi - 1]) / (log2_sizes[hi] - log2_sizes[hi - 1])

        def lerp(x: float, y: float) -> float:
            return x + (y - x) * t

        vram = (
            lerp(a.peak_vram_bytes, b.peak_vram_bytes)
            if a.peak_vram_bytes is not None and b.peak_vram_bytes is not None
            else None
        )
        return ProfilePoint(
            size=size,
            tokens_per_s=lerp(a.tokens_per_s, b.tokens_per_s),
            joules_per_token=lerp(a.joules_per_token, b.joules_per_token),
            power_w=lerp(a.power_w, b.power_w),
            peak_vram_bytes=vram,
        )


def _rescaled(edge: ProfilePoint, size: float) -> ProfilePoint:
    """Outside the measured range: same step time, J/token and power as the nearest point."""
    if edge.size == size:
        return edge
    tokens_per_s = edge.tokens_per_s * size / edge.size
    return ProfilePoint(size, tokens_per_s, edge.joules_per_token, edge.power_w, edge.peak_vram_bytes)


def fit_power_law(points: Sequence[ProfilePoint]) -> tuple[float, float]:
    """Least-squares fit of J/token = C · size^-α on log-log axes; returns (C, α)."""
    if len(points) < 2:
        raise ValueError("fit_power_law needs at least two points")
    xs = [math.log(p.size) for p in points]
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


def _point(where: str, raw: Mapping[str, Any], kind: str) -> ProfilePoint:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping")
    size_key = SIZE_KEY[kind]
    other = SIZE_KEY["continuous" if kind == "static" else "static"]
    if other in raw:
        raise ConfigError(
            f"{where}.{other} does not belong in a kind: {kind} profile: its points are per {size_key}"
        )
    known = _POINT_KEYS | {size_key}
    unknown = sorted(k for k in raw if k not in known and not k.startswith(("seed_", "measured_")))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a point field; known: {sorted(known)}")
    for required in (size_key, "tokens_per_s"):
        if required not in raw:
            raise ConfigError(f"{where}.{required} is missing")
    if ("joules_per_token" in raw) == ("joules_per_1k_tokens" in raw):
        raise ConfigError(f"{where}: give exactly one of joules_per_token or joules_per_1k_tokens")
    bs = _number(where, size_key, raw[size_key])
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
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ConfigError(
            f"{where}.kind={kind!r} must be one of {_KINDS}: static (points per batch_size, for HF or "
            "simulated static batches) or continuous (points per concurrency, for vLLM)"
        )
    raw_points = data.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise ConfigError(f"{where}.points must be a non-empty list")
    points = sorted(
        (_point(f"{where}.points[{i}]", p, kind) for i, p in enumerate(raw_points)), key=lambda p: p.size
    )
    idle = data.get("idle_power_w")
    prefill = data.get("prefill_joules_per_token")
    lag = data.get("counter_lag_s")
    if lag is not None and (isinstance(lag, bool) or not isinstance(lag, int | float) or not 0 <= lag <= 5):
        raise ConfigError(f"{where}.counter_lag_s={lag!r} must be a number of seconds from 0 to 5")
    return EnergyProfile(
        name=str(data.get("name", where)),
        source=data.get("source", "reference"),
        points=tuple(points),
        kind=kind,
        gpu=str(data.get("gpu", "unknown")),
        model=str(data.get("model", "unknown")),
        quantization=data.get("quantization"),
        engine=data.get("engine"),
        idle_power_w=None if idle is None else _number(where, "idle_power_w", idle),
        meta=dict(data.get("meta") or {}),
        prefill_joules_per_token=None
        if prefill is None
        else _number(where, "prefill_joules_per_token", prefill),
        counter_lag_s=None if lag is None else float(lag),
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
    try:
        return profile_from_mapping(data)
    except ConfigError as exc:  # "FILE: profile.points[2].power_w=…": the file, then the field in it
        raise ConfigError(f"{p}: {exc}", field=exc.field) from None

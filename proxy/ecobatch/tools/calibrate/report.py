"""Calibration results: the points, the progress line, and the files (profile YAML, CSV, PNG).

The profile holds measured points only (``source: measured``), per batch size for static engines or
per concurrency for continuous ones; the fitted exponent α of J/request ∝ size^-α is reported beside
it, never used by the policy.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ...config import DEFAULT_PROFILES
from ...profile import SIZE_KEY, EnergyProfile, ProfilePoint, fit_power_law, load_profile
from .measure import EnergyWindow

__all__ = ["CalibrationPoint", "make_point", "report_line", "to_profile", "write_outputs"]


@dataclass(frozen=True, slots=True)
class CalibrationPoint:
    size: int
    runs: int
    seconds: float
    generated_tokens: int
    tokens_per_s: float
    joules: float
    joules_per_token: float
    joules_per_1k_tokens: float
    joules_per_request: float
    net_joules_per_1k_tokens: float
    mean_power_w: float
    peak_power_w: float
    gpu_util_pct: float
    step_ms: float | None
    prefill_ms: float | None
    peak_vram_bytes: int | None


def make_point(
    size: int,
    runs: int,
    window: EnergyWindow,
    generated: int,
    requests: float,
    idle_power_w: float,
    *,
    step_ms: float | None = None,
    prefill_ms: float | None = None,
    peak_vram_bytes: int | None = None,
) -> CalibrationPoint:
    net = window.joules - idle_power_w * window.seconds
    return CalibrationPoint(
        size=size,
        runs=runs,
        seconds=window.seconds,
        generated_tokens=generated,
        tokens_per_s=generated / window.seconds,
        joules=window.joules,
        joules_per_token=window.joules / generated,
        joules_per_1k_tokens=1000 * window.joules / generated,
        joules_per_request=window.joules / requests,
        net_joules_per_1k_tokens=1000 * net / generated,
        mean_power_w=window.joules / window.seconds,
        peak_power_w=window.peak_power_w,
        gpu_util_pct=window.util_pct,
        step_ms=step_ms,
        prefill_ms=prefill_ms,
        peak_vram_bytes=peak_vram_bytes,
    )


def report_line(progress: Callable[[str], None], p: CalibrationPoint, done: int, total: int) -> None:
    step = f"step {p.step_ms:6.1f} ms  " if p.step_ms is not None else ""
    bar = "#" * done + "." * (total - done)
    progress(
        f"[{bar}] {done}/{total}  size {p.size:>3}: {p.tokens_per_s:8.1f} tok/s  "
        f"{p.joules_per_1k_tokens:8.1f} J/1k tok  "
        f"{p.joules_per_request:8.1f} J/request  {p.mean_power_w:6.1f} W  {step}"
        f"util {p.gpu_util_pct:4.0f}%  ({p.runs} run(s), {p.seconds:.1f} s)"
    )


_META_FIELDS = {"name", "kind", "gpu", "model", "quantization", "engine", "idle_power_w"}


def to_profile(points: Sequence[CalibrationPoint], meta: dict[str, Any]) -> dict[str, Any]:
    kind = meta["kind"]
    prefill = meta.get("prefill")
    profile: dict[str, Any] = {
        "kind": kind,
        "name": meta["name"],
        "source": "measured",
        "gpu": meta["gpu"],
        "model": meta["model"],
        "quantization": meta["quantization"],
        "engine": meta["engine"],
        "idle_power_w": round(meta["idle_power_w"], 2),
        "meta": {k: v for k, v in meta.items() if k not in _META_FIELDS},
        "points": [_profile_point(p, SIZE_KEY[kind]) for p in points],
    }
    if prefill:  # measured above idle: the ledger weighs prompt tokens by it
        profile["prefill_joules_per_token"] = round(prefill["joules_per_token"], 6)
    lag = meta.get("counter_lag")
    if lag:  # the meter places the counter's intervals this much earlier
        profile["counter_lag_s"] = round(lag["lag_s"], 4)
    return profile


def _profile_point(p: CalibrationPoint, size_key: str) -> dict[str, Any]:
    point: dict[str, Any] = {
        size_key: p.size,
        "tokens_per_s": round(p.tokens_per_s, 3),
        "joules_per_token": round(p.joules_per_token, 6),
        "power_w": round(p.mean_power_w, 2),
    }
    if p.peak_vram_bytes is not None:
        point["peak_vram_bytes"] = p.peak_vram_bytes
    point.update(
        measured_joules_per_request=round(p.joules_per_request, 3),
        measured_net_joules_per_1k_tokens=round(p.net_joules_per_1k_tokens, 2),
        measured_peak_power_w=round(p.peak_power_w, 1),
        measured_gpu_util_pct=round(p.gpu_util_pct, 1),
    )
    if p.step_ms is not None:
        point["measured_step_ms"] = round(p.step_ms, 2)
    return point


def write_outputs(points: Sequence[CalibrationPoint], meta: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write PROFILE.yaml, PROFILE.csv and PROFILE.png (when matplotlib is there) beside each other."""
    out.parent.mkdir(parents=True, exist_ok=True)
    size_key = SIZE_KEY[meta["kind"]]
    if len(points) >= 2:
        as_profile = [
            ProfilePoint(p.size, p.tokens_per_s, p.joules_per_request, p.mean_power_w) for p in points
        ]
        meta["alpha_joules_per_request"] = round(fit_power_law(as_profile)[1], 3)
    header = (
        "# Measured by `ecobatch calibrate` (command in meta.command). Points are measurements; the\n"
        f"# policy interpolates between them in log2({size_key}).\n"
    )
    out.write_text(header + yaml.safe_dump(to_profile(points, meta), sort_keys=False))
    written = {"profile": out}
    csv_path = out.with_suffix(".csv")
    with csv_path.open("w", newline="") as f:
        rows = [{(size_key if k == "size" else k): v for k, v in asdict(p).items()} for p in points]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written["csv"] = csv_path
    with contextlib.suppress(ImportError):
        written["png"] = _plot(points, meta, out.with_suffix(".png"))
    return written


def _plot(points: Sequence[CalibrationPoint], meta: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = meta["kind"]
    ref: EnergyProfile = load_profile(DEFAULT_PROFILES[kind])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [p.size for p in points]
    a.loglog(
        sizes,
        [p.joules_per_1k_tokens for p in points],
        "o-",
        label=f"{meta['gpu']} {meta['quantization']} (measured)",
    )
    a.loglog(
        sizes, [p.net_joules_per_1k_tokens for p in points], "o--", alpha=0.6, label="measured, net of idle"
    )
    b.loglog(sizes, [p.tokens_per_s for p in points], "o-", label="measured")
    ref_sizes = [p.size for p in ref.points]
    a.loglog(ref_sizes, [p.joules_per_1k_tokens for p in ref.points], "s:", label=f"{ref.name} (reference)")
    b.loglog(ref_sizes, [p.tokens_per_s for p in ref.points], "s:", label=f"{ref.name} (reference)")
    for axis, ylabel in ((a, "J per 1k generated tokens"), (b, "generated tokens / s")):
        axis.set_xlabel(SIZE_KEY[kind].replace("_", " "))
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(
        f"{meta['name']}: {meta['model']}, {meta['new_tokens']} new tokens, "
        f"{meta['prompt_tokens']}-token prompts"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

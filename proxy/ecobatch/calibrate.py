"""``ecobatch calibrate``: measure a GPU's energy curve and write it as a profile.

ML.ENERGY's method, scaled to a short sweep: per batch size, a warm-up run, then timed runs of
``new_tokens`` generated tokens (EOS ignored, greedy) repeated until ``min_seconds`` have passed;
energy from the NVML total-energy counter over exactly that window; measured points only, no fit in
the profile (the fitted exponent α of J/request ∝ BS^-α is reported beside it). cuDNN SDPA is
disabled by default (see ``hf_bnb``), so every timed run is warm; the warm-up covers the rest
(allocator, kernels' first launches).

Outputs: the profile YAML (``source: measured``, GPU, driver, model, dtype, date, method), a CSV with
every column, and a PNG (J/1k tokens and tok/s against batch size, the A800 reference beside it).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULT_PROFILE
from .gpu import Gpu, discover_gpus
from .profile import EnergyProfile, ProfilePoint, fit_power_law, load_profile

__all__ = ["CalibrationPoint", "calibrate_hf", "write_outputs"]


@dataclass(frozen=True, slots=True)
class CalibrationPoint:
    batch_size: int
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
    step_ms: float
    prefill_ms: float
    peak_vram_bytes: int


class _PowerSampler:
    """Samples board power and utilization in a thread while a measurement runs."""

    def __init__(self, gpus: Sequence[Gpu], interval_s: float = 0.05) -> None:
        self._gpus, self._interval_s = gpus, interval_s
        self.power_w: list[float] = []
        self.util_pct: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import pynvml

        while not self._stop.is_set():
            self.power_w.append(sum(g.power_mw() for g in self._gpus) / 1000.0)
            utils = []
            for g in self._gpus:
                handle = pynvml.nvmlDeviceGetHandleByIndex(g.facts.index)
                utils.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.util_pct.append(sum(utils) / len(utils))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> _PowerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _energy_mj(gpus: Sequence[Gpu]) -> int:
    total = 0
    for g in gpus:
        mj = g.total_energy_mj()
        if mj is None:
            raise RuntimeError(
                f"GPU {g.facts.index} has no energy counter; calibrate needs one (Volta or newer)"
            )
        total += mj
    return total


def measure_idle_power_w(gpus: Sequence[Gpu], seconds: float = 3.0) -> float:
    with _PowerSampler(gpus) as sampler:
        time.sleep(seconds)
    return sum(sampler.power_w) / max(len(sampler.power_w), 1)


def calibrate_hf(
    model_path: str,
    *,
    dtype: str,
    batch_sizes: Sequence[int],
    new_tokens: int,
    prompt_tokens: int,
    min_seconds: float,
    warmup_tokens: int,
    gpus: Sequence[Gpu],
    idle_power_w: float,
    progress: Callable[[str], None] = print,
) -> tuple[list[CalibrationPoint], dict[str, Any]]:
    """Run the sweep with the hf-bnb backend's own generator; return the points and run facts."""
    import torch

    from .backends.hf_bnb import SeqSpec, StaticBatchGenerator, load_model

    loaded = load_model(model_path, dtype=dtype, device="cuda")
    progress(f"loaded {model_path} as {dtype} in {loaded.load_s:.1f} s")
    gen = StaticBatchGenerator(loaded)
    vocab = loaded.model.config.vocab_size
    specials = set(loaded.tokenizer.all_special_ids)
    rng = random.Random(0)
    points = []
    for bs in batch_sizes:
        prompts = [
            [t for t in (rng.randrange(3, vocab) for _ in range(prompt_tokens * 2)) if t not in specials][
                :prompt_tokens
            ]
            for _ in range(bs)
        ]

        def batch(tokens: int, prompts: list[list[int]] = prompts) -> list[SeqSpec]:
            return [
                SeqSpec(prompt_ids=p, max_tokens=tokens, temperature=0.0, ignore_eos=True) for p in prompts
            ]

        gen.run(batch(warmup_tokens))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        runs, generated, prefill_s, decode_s, steps = 0, 0, 0.0, 0.0, 0
        with _PowerSampler(gpus) as sampler:
            e0, t0 = _energy_mj(gpus), time.monotonic()
            while runs == 0 or time.monotonic() - t0 < min_seconds:
                seqs = batch(new_tokens)
                stats = gen.run(seqs)
                runs += 1
                generated += sum(len(s.generated) for s in seqs)
                prefill_s += stats.prefill_s
                decode_s += stats.decode_s
                steps += stats.steps
            t1, e1 = time.monotonic(), _energy_mj(gpus)
        seconds, joules = t1 - t0, (e1 - e0) / 1000.0
        net = joules - idle_power_w * seconds
        point = CalibrationPoint(
            batch_size=bs,
            runs=runs,
            seconds=seconds,
            generated_tokens=generated,
            tokens_per_s=generated / seconds,
            joules=joules,
            joules_per_token=joules / generated,
            joules_per_1k_tokens=1000 * joules / generated,
            joules_per_request=joules / (bs * runs),
            net_joules_per_1k_tokens=1000 * net / generated,
            mean_power_w=joules / seconds,
            peak_power_w=max(sampler.power_w, default=0.0),
            gpu_util_pct=sum(sampler.util_pct) / max(len(sampler.util_pct), 1),
            step_ms=1000 * decode_s / max(steps - runs, 1),
            prefill_ms=1000 * prefill_s / runs,
            peak_vram_bytes=int(torch.cuda.max_memory_allocated()),
        )
        points.append(point)
        progress(
            f"BS {bs:>3}: {point.tokens_per_s:8.1f} tok/s  {point.joules_per_1k_tokens:8.1f} J/1k tok  "
            f"{point.joules_per_request:8.1f} J/request  {point.mean_power_w:6.1f} W  "
            f"step {point.step_ms:6.1f} ms  "
            f"util {point.gpu_util_pct:4.0f}%  ({runs} run(s), {seconds:.1f} s)"
        )
    facts = {
        "load_s": round(loaded.load_s, 2),
        "cudnn_sdpa": bool(torch.backends.cuda.cudnn_sdp_enabled()),
        "torch": str(torch.__version__),
    }
    return points, facts


def to_profile(points: Sequence[CalibrationPoint], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": meta["name"],
        "source": "measured",
        "gpu": meta["gpu"],
        "model": meta["model"],
        "quantization": meta["quantization"],
        "engine": meta["engine"],
        "idle_power_w": round(meta["idle_power_w"], 2),
        "meta": {
            k: v
            for k, v in meta.items()
            if k not in {"name", "gpu", "model", "quantization", "engine", "idle_power_w"}
        },
        "points": [
            {
                "batch_size": p.batch_size,
                "tokens_per_s": round(p.tokens_per_s, 3),
                "joules_per_token": round(p.joules_per_token, 6),
                "power_w": round(p.mean_power_w, 2),
                "peak_vram_bytes": p.peak_vram_bytes,
                "measured_joules_per_request": round(p.joules_per_request, 3),
                "measured_net_joules_per_1k_tokens": round(p.net_joules_per_1k_tokens, 2),
                "measured_peak_power_w": round(p.peak_power_w, 1),
                "measured_gpu_util_pct": round(p.gpu_util_pct, 1),
                "measured_step_ms": round(p.step_ms, 2),
            }
            for p in points
        ],
    }


def write_outputs(points: Sequence[CalibrationPoint], meta: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write PROFILE.yaml, PROFILE.csv and PROFILE.png (when matplotlib is there) beside each other."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(points) >= 2:
        as_profile = [
            ProfilePoint(p.batch_size, p.tokens_per_s, p.joules_per_request, p.mean_power_w) for p in points
        ]
        meta["alpha_joules_per_request"] = round(fit_power_law(as_profile)[1], 3)
    header = (
        "# Measured by `ecobatch calibrate` (command in meta.command). Points are measurements; the\n"
        "# policy interpolates between them in log2(batch size).\n"
    )
    out.write_text(header + yaml.safe_dump(to_profile(points, meta), sort_keys=False))
    written = {"profile": out}
    csv_path = out.with_suffix(".csv")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        for p in points:
            writer.writerow(asdict(p))
    written["csv"] = csv_path
    with contextlib.suppress(ImportError):
        written["png"] = _plot(points, meta, out.with_suffix(".png"))
    return written


def _plot(points: Sequence[CalibrationPoint], meta: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref: EnergyProfile = load_profile(DEFAULT_PROFILE)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    bs = [p.batch_size for p in points]
    a.loglog(
        bs,
        [p.joules_per_1k_tokens for p in points],
        "o-",
        label=f"{meta['gpu']} {meta['quantization']} (measured)",
    )
    a.loglog(
        bs, [p.net_joules_per_1k_tokens for p in points], "o--", alpha=0.6, label="measured, net of idle"
    )
    a.loglog(
        [p.batch_size for p in ref.points],
        [p.joules_per_1k_tokens for p in ref.points],
        "s:",
        label="A800 INT8 seed (reference)",
    )
    a.set_xlabel("batch size")
    a.set_ylabel("J per 1k generated tokens")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    b.loglog(bs, [p.tokens_per_s for p in points], "o-", label="measured")
    b.loglog(
        [p.batch_size for p in ref.points],
        [p.tokens_per_s for p in ref.points],
        "s:",
        label="A800 seed (reference)",
    )
    b.set_xlabel("batch size")
    b.set_ylabel("generated tokens / s")
    b.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=8)
    fig.suptitle(
        f"{meta['name']}: {meta['model']}, {meta['new_tokens']} new tokens, "
        f"{meta['prompt_tokens']}-token prompts"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_cli(args: Any) -> int:
    """Entry for ``ecobatch calibrate`` (argparse namespace from cli.py)."""
    if args.backend != "hf-bnb":
        raise SystemExit("ecobatch calibrate: only --backend hf-bnb is implemented so far")
    gpus = discover_gpus()
    if not gpus:
        raise SystemExit("ecobatch calibrate: no NVIDIA GPU found through NVML; calibration needs one")
    t0 = time.monotonic()
    idle_w = measure_idle_power_w(gpus)
    print(f"idle power: {idle_w:.1f} W over 3 s on GPU {[g.facts.index for g in gpus]}")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    points, facts = calibrate_hf(
        args.model,
        dtype=args.dtype,
        batch_sizes=sizes,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        min_seconds=args.min_seconds,
        warmup_tokens=args.warmup_tokens,
        gpus=gpus,
        idle_power_w=idle_w,
    )
    wall_s = time.monotonic() - t0
    quant = "bitsandbytes-int8 (llm_int8_threshold=0.0)" if args.dtype == "int8" else args.dtype
    meta = {
        "name": Path(args.out).stem,
        "gpu": gpus[0].facts.name if len(gpus) == 1 else "+".join(g.facts.name for g in gpus),
        "model": args.model_label or args.model,
        "quantization": quant,
        "engine": "ecobatch hf-bnb static batches (transformers)",
        "idle_power_w": idle_w,
        "driver": gpus[0].facts.driver,
        "date": dt.date.today().isoformat(),
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "min_seconds": args.min_seconds,
        "warmup": f"one run of {args.warmup_tokens} tokens per batch size; cuDNN SDPA disabled",
        "wall_s": round(wall_s, 1),
        "command": args.command_line,
        **facts,
    }
    written = write_outputs(points, meta, Path(args.out))
    print(json.dumps({k: str(v) for k, v in written.items()}))
    print(
        f"calibrate wall time: {wall_s:.1f} s (load included); "
        f"alpha(J/request) = {meta.get('alpha_joules_per_request')}"
    )
    return 0

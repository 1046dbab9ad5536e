"""``ecobatch calibrate``: measure a GPU's energy curve and write it as a profile.

ML.ENERGY's method, scaled to a short sweep; energy from the NVML total-energy counter over exactly the
timed window; measured points only, no fit in the profile (the fitted exponent α of J/request ∝ BS^-α
is reported beside it).

* ``hf-bnb`` (static batches, in this process): per batch size a warm-up run, then timed runs of
  ``new_tokens`` tokens (EOS ignored, greedy) repeated until ``min_seconds`` have passed. cuDNN SDPA is
  disabled (see ``hf_bnb``), so every timed run is warm; the warm-up covers allocator and first launches.
* ``vllm-http`` (a running vLLM server on this machine's GPUs): per batch size C, a closed loop keeps C
  requests of ``prompt_tokens`` token ids and ``new_tokens`` tokens in flight; after ``warmup_s`` the
  window opens, lasts ``min_seconds``, and counts generated tokens from vLLM's own
  ``vllm:generation_tokens_total``; then the loop stops and in-flight requests drain (cool-down).

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
    step_ms: float | None
    prefill_ms: float | None
    peak_vram_bytes: int | None


class _PowerSampler:
    """Samples board power and utilization in a thread while a measurement runs."""

    def __init__(self, gpus: Sequence[Gpu], interval_s: float = 0.05) -> None:
        self._gpus, self._interval_s = gpus, interval_s
        self.power_w: list[float] = []
        self.util_pct: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.power_w.append(sum(g.power_mw() for g in self._gpus) / 1000.0)
            self.util_pct.append(sum(g.utilization_pct() for g in self._gpus) / len(self._gpus))
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


@dataclass(slots=True)
class EnergyWindow:
    """A timed window: seconds, joules (NVML counter) and power/utilization samples over it."""

    gpus: Sequence[Gpu]
    seconds: float = 0.0
    joules: float = 0.0
    peak_power_w: float = 0.0
    util_pct: float = 0.0
    _sampler: _PowerSampler | None = None
    _t0: float = 0.0
    _e0: int = 0

    def __enter__(self) -> EnergyWindow:
        self._sampler = _PowerSampler(self.gpus).__enter__()
        self._e0, self._t0 = _energy_mj(self.gpus), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        t1, e1 = time.monotonic(), _energy_mj(self.gpus)
        assert self._sampler is not None
        self._sampler.__exit__()
        self.seconds, self.joules = t1 - self._t0, (e1 - self._e0) / 1000.0
        self.peak_power_w = max(self._sampler.power_w, default=0.0)
        self.util_pct = sum(self._sampler.util_pct) / max(len(self._sampler.util_pct), 1)


def _point(
    bs: int,
    runs: int,
    window: EnergyWindow,
    generated: int,
    requests: float,
    idle_power_w: float,
    **extra: Any,
) -> CalibrationPoint:
    net = window.joules - idle_power_w * window.seconds
    return CalibrationPoint(
        batch_size=bs,
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
        step_ms=extra.get("step_ms"),
        prefill_ms=extra.get("prefill_ms"),
        peak_vram_bytes=extra.get("peak_vram_bytes"),
    )


def _report(progress: Callable[[str], None], p: CalibrationPoint, done: int, total: int) -> None:
    step = f"step {p.step_ms:6.1f} ms  " if p.step_ms is not None else ""
    bar = "#" * done + "." * (total - done)
    progress(
        f"[{bar}] {done}/{total}  BS {p.batch_size:>3}: {p.tokens_per_s:8.1f} tok/s  "
        f"{p.joules_per_1k_tokens:8.1f} J/1k tok  "
        f"{p.joules_per_request:8.1f} J/request  {p.mean_power_w:6.1f} W  {step}"
        f"util {p.gpu_util_pct:4.0f}%  ({p.runs} run(s), {p.seconds:.1f} s)"
    )


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
        with EnergyWindow(gpus) as window:
            t0 = time.monotonic()
            while runs == 0 or time.monotonic() - t0 < min_seconds:
                seqs = batch(new_tokens)
                stats = gen.run(seqs)
                runs += 1
                generated += sum(len(s.generated) for s in seqs)
                prefill_s += stats.prefill_s
                decode_s += stats.decode_s
                steps += stats.steps
            torch.cuda.synchronize()
        point = _point(
            bs,
            runs,
            window,
            generated,
            bs * runs,
            idle_power_w,
            step_ms=1000 * decode_s / max(steps - runs, 1),
            prefill_ms=1000 * prefill_s / runs,
            peak_vram_bytes=int(torch.cuda.max_memory_allocated()),
        )
        points.append(point)
        _report(progress, point, len(points), len(batch_sizes))
    facts = {
        "load_s": round(loaded.load_s, 2),
        "cudnn_sdpa": bool(torch.backends.cuda.cudnn_sdp_enabled()),
        "torch": str(torch.__version__),
    }
    return points, facts


async def _generation_tokens(session: Any, base: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm:generation_tokens_total"
    )


async def calibrate_vllm_http(
    base_url: str,
    *,
    batch_sizes: Sequence[int],
    new_tokens: int,
    prompt_tokens: int,
    min_seconds: float,
    warmup_s: float,
    gpus: Sequence[Gpu],
    idle_power_w: float,
    model: str | None = None,
    progress: Callable[[str], None] = print,
) -> tuple[list[CalibrationPoint], dict[str, Any]]:
    """Closed-loop sweep against a running vLLM OpenAI server whose GPUs are ``gpus``."""
    import asyncio

    import aiohttp

    base = base_url.rstrip("/")
    rng = random.Random(0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.get(f"{base}/v1/models") as resp:
            resp.raise_for_status()
            served = (await resp.json())["data"][0]
        model = model or served["id"]
        vocab_guess = 256  # token ids below this exist in any vocabulary worth measuring
        points = []
        for c in batch_sizes:
            stop = asyncio.Event()
            finished = 0

            async def worker(stop: asyncio.Event = stop) -> None:
                nonlocal finished
                while not stop.is_set():
                    body = {
                        "model": model,
                        "prompt": [rng.randrange(3, vocab_guess) for _ in range(prompt_tokens)],
                        "max_tokens": new_tokens,
                        "ignore_eos": True,
                        "temperature": 0.0,
                    }
                    async with session.post(f"{base}/v1/completions", json=body) as r:
                        if r.status != 200:
                            raise RuntimeError(f"vLLM answered {r.status}: {(await r.text())[:300]}")
                        await r.read()
                    finished += 1

            tasks = [asyncio.create_task(worker()) for _ in range(c)]
            try:
                await asyncio.sleep(warmup_s)
                tokens0 = await _generation_tokens(session, base)
                done0 = finished
                with EnergyWindow(gpus) as window:
                    await asyncio.sleep(min_seconds)
                tokens1 = await _generation_tokens(session, base)
                done1 = finished
            finally:
                stop.set()
                results = await asyncio.gather(*tasks, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            generated = int(tokens1 - tokens0)
            if generated <= 0:
                raise RuntimeError(f"vLLM generated no tokens in {min_seconds} s at {c} in flight")
            point = _point(c, done1 - done0, window, generated, generated / new_tokens, idle_power_w)
            points.append(point)
            _report(progress, point, len(points), len(batch_sizes))
    return points, {"served_model": model, "max_model_len": served.get("max_model_len")}


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
        "points": [_profile_point(p) for p in points],
    }


def _profile_point(p: CalibrationPoint) -> dict[str, Any]:
    point: dict[str, Any] = {
        "batch_size": p.batch_size,
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
    b.loglog(bs, [p.tokens_per_s for p in points], "o-", label="measured")
    ref_bs = [p.batch_size for p in ref.points]
    a.loglog(ref_bs, [p.joules_per_1k_tokens for p in ref.points], "s:", label="A800 INT8 seed (reference)")
    b.loglog(ref_bs, [p.tokens_per_s for p in ref.points], "s:", label="A800 seed (reference)")
    for axis, ylabel in ((a, "J per 1k generated tokens"), (b, "generated tokens / s")):
        axis.set_xlabel("batch size")
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


def run_cli(args: Any) -> int:
    """Entry for ``ecobatch calibrate`` (argparse namespace from cli.py)."""
    import asyncio

    gpus = discover_gpus()
    if not gpus:
        raise SystemExit("ecobatch calibrate: no NVIDIA GPU found through NVML; calibration needs one")
    t0 = time.monotonic()
    idle_w = measure_idle_power_w(gpus)
    print(f"idle power: {idle_w:.1f} W over 3 s on GPU {[g.facts.index for g in gpus]}")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    common = {
        "batch_sizes": sizes,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "min_seconds": args.min_seconds,
        "gpus": gpus,
        "idle_power_w": idle_w,
    }
    if args.backend == "hf-bnb":
        points, facts = calibrate_hf(args.model, dtype=args.dtype, warmup_tokens=args.warmup_tokens, **common)
        quant = "bitsandbytes-int8 (llm_int8_threshold=0.0)" if args.dtype == "int8" else args.dtype
        engine, method = (
            "ecobatch hf-bnb static batches (transformers)",
            (f"one run of {args.warmup_tokens} tokens per batch size; cuDNN SDPA disabled"),
        )
    else:
        points, facts = asyncio.run(calibrate_vllm_http(args.model, warmup_s=args.warmup_s, **common))
        quant, engine = args.quantization_label, "vLLM OpenAI server (continuous batching), closed loop"
        method = f"{args.warmup_s} s at the concurrency before the window; requests drain after it"
    wall_s = time.monotonic() - t0
    meta = {
        "name": Path(args.out).stem,
        "gpu": gpus[0].facts.name if len(gpus) == 1 else "+".join(g.facts.name for g in gpus),
        "model": args.model_label or args.model,
        "quantization": quant,
        "engine": engine,
        "idle_power_w": idle_w,
        "driver": gpus[0].facts.driver,
        "date": dt.date.today().isoformat(),
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "min_seconds": args.min_seconds,
        "warmup": method,
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

"""``ecobatch calibrate``: measure a GPU's energy curve and write it as a profile.

ML.ENERGY's method, scaled to a short sweep: a warm-up, then a timed window per point; energy from the
NVML total-energy counters (read as the serving meter reads them) over exactly that window; measured
points only, no fit in the profile. Modules: ``measure`` (the energy window), ``sweeps`` (HF static
batches per batch size, a vLLM server per concurrency), ``report`` (profile YAML, CSV, PNG).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from ...energy.counters import NvmlCounters
from ...energy.gpu import discover_gpus
from .measure import EnergyWindow, measure_idle_power_w
from .report import CalibrationPoint, to_profile, write_outputs
from .sweeps import calibrate_hf, calibrate_vllm_http

__all__ = [
    "CalibrationPoint",
    "EnergyWindow",
    "calibrate_hf",
    "calibrate_vllm_http",
    "run_cli",
    "to_profile",
    "write_outputs",
]


def run_cli(args: Any) -> int:
    """Entry for ``ecobatch calibrate`` (argparse namespace from cli.py)."""
    import asyncio

    gpus = discover_gpus()
    if not gpus:
        raise SystemExit("ecobatch calibrate: no NVIDIA GPU found through NVML; calibration needs one")
    counters = NvmlCounters(gpus)
    t0 = time.monotonic()
    idle_w = measure_idle_power_w(gpus)
    print(f"idle power: {idle_w:.1f} W over 3 s on GPU {[g.facts.index for g in gpus]}")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    common = {
        "batch_sizes": sizes,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "min_seconds": args.min_seconds,
        "counters": counters,
        "idle_power_w": idle_w,
    }
    if args.backend == "hf-bnb":
        points, facts = calibrate_hf(args.model, dtype=args.dtype, warmup_tokens=args.warmup_tokens, **common)
        quant = "bitsandbytes-int8 (llm_int8_threshold=0.0)" if args.dtype == "int8" else args.dtype
        kind, engine = "static", "ecobatch hf-bnb static batches (transformers)"
        method = f"one run of {args.warmup_tokens} tokens per batch size; cuDNN SDPA disabled"
    else:
        points, facts = asyncio.run(
            calibrate_vllm_http(
                args.model,
                warmup_s=args.warmup_s,
                prefill_prompt_tokens=args.prefill_prompt_tokens,
                prefill_concurrency=args.prefill_concurrency,
                **common,
            )
        )
        quant, kind = args.quantization_label, "continuous"
        engine = "vLLM OpenAI server (continuous batching), closed loop"
        method = f"{args.warmup_s} s at the concurrency before the window; requests drain after it"
    wall_s = time.monotonic() - t0
    meta = {
        "kind": kind,
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

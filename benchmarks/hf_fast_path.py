"""Is the HF path host-bound, and does a static KV cache + CUDA graphs (torch.compile) make it GPU-bound?

For each dtype and batch size: (a) ecobatch's eager decode loop (what `hf-bnb` serves and `calibrate`
measures), (b) transformers `generate` eager (the reference sweep's method), (c) transformers `generate`
with `cache_implementation="static"` and `torch.compile(mode="reduce-overhead")` (CUDA graphs). Each
is warmed (one identical run; that run's time is the compile/capture cost), then timed over one run of
NEW_TOKENS tokens: tok/s, ms per step, NVML J/1k tokens, mean power and NVML utilization. A
configuration that fails is recorded with its error: what did not work is a result too.

    python benchmarks/hf_fast_path.py MODEL_DIR OUT.json [--dtypes bfloat16,int8] [--batch-sizes 1,64]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import traceback
from pathlib import Path
from typing import Any

from ecobatch.energy.counters import NvmlCounters
from ecobatch.energy.gpu import discover_gpus
from ecobatch.engines.hf_bnb import SeqSpec, StaticBatchGenerator, load_model
from ecobatch.tools.calibrate import EnergyWindow

NEW_TOKENS = 128
PROMPT_TOKENS = 128


def measure(gpus: list[Any], fn: Any, tokens: int) -> dict[str, float]:
    import torch

    torch.cuda.synchronize()
    with EnergyWindow(NvmlCounters(gpus)) as window:
        fn()
        torch.cuda.synchronize()
    joules, seconds = window.joules, window.seconds
    return {
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "ms_per_step": round(1000 * seconds / NEW_TOKENS, 2),
        "joules_per_1k_tokens": round(1000 * joules / tokens, 1),
        "mean_power_w": round(joules / seconds, 1),
        "nvml_util_pct": round(window.util_pct, 1),
    }


def run_dtype(
    model_path: str, dtype: str, sizes: list[int], variants: list[str], gpus: list[Any]
) -> list[dict[str, Any]]:
    import torch

    loaded = load_model(model_path, dtype=dtype, device="cuda")
    model, tok = loaded.model, loaded.tokenizer
    gen = StaticBatchGenerator(loaded)
    eager_forward = model.forward
    rng = random.Random(0)
    rows = []
    for bs in sizes:
        vocab = model.config.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(bs)]
        ids = torch.tensor(prompts, device="cuda")
        mask = torch.ones_like(ids)

        def ours(prompts: list[list[int]] = prompts) -> None:
            gen.run([SeqSpec(p, NEW_TOKENS, temperature=0.0, ignore_eos=True) for p in prompts])

        def hf(ids: Any = ids, mask: Any = mask, **kw: Any) -> None:
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                **kw,
            )

        calls = {
            "ours_eager": ours,
            "hf_generate_eager": hf,
            "hf_generate_static_compiled": lambda: hf(cache_implementation="static"),
        }
        for name in variants:
            row: dict[str, Any] = {"dtype": dtype, "batch_size": bs, "variant": name}
            try:
                if name == "hf_generate_static_compiled":
                    model.forward = torch.compile(eager_forward, mode="reduce-overhead", fullgraph=False)
                t = time.monotonic()
                calls[name]()
                torch.cuda.synchronize()
                row["warmup_s"] = round(time.monotonic() - t, 1)
                row.update(measure(gpus, calls[name], bs * NEW_TOKENS))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc(limit=3)
            finally:
                model.forward = eager_forward
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--dtypes", default="bfloat16,int8")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--variants", default="ours_eager,hf_generate_eager,hf_generate_static_compiled")
    args = parser.parse_args()
    gpus = discover_gpus()
    results: list[dict[str, Any]] = []
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    for dtype in args.dtypes.split(","):
        results.extend(run_dtype(args.model, dtype, sizes, args.variants.split(","), gpus))
        Path(args.out).write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

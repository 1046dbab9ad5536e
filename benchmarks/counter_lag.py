"""How late does the GPU's energy counter report the energy? Bursts of work on an idle vLLM server, the
counter sampled every 5 ms, the delay read off each burst's rising and falling edge
(``ecobatch.tools.calibrate.lag``). ``ecobatch calibrate --backend vllm-http`` measures the same and writes it
into the profile (``counter_lag_s``); this measures it alone, in seconds, for a run that needs only it.

    python benchmarks/counter_lag.py --url http://127.0.0.1:8000 --out benchmarks/results/counter-lag.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from ecobatch.engines import upstream_http
from ecobatch.tools.calibrate.lag import completion_bursts, probe_counter_lag
from energy_truth import _WORDS, Counter


async def main(args: argparse.Namespace) -> dict[str, Any]:
    counter = Counter(args.counter)  # its own 20 ms trace is not used: the probe samples every 5 ms
    try:
        e0, t0 = counter.read_j(), time.monotonic()
        await asyncio.sleep(args.idle_s)
        idle_w = (counter.read_j() - e0) / (time.monotonic() - t0)
        rng = random.Random(0)
        async with upstream_http.session() as http:
            async with http.get(f"{args.url}/v1/models") as r:
                model = (await r.json())["data"][0]["id"]

            def body() -> dict[str, Any]:
                words = " ".join(rng.choice(_WORDS) for _ in range(args.prompt_tokens))
                return {"model": model, "prompt": words, "max_tokens": args.output_tokens, "ignore_eos": True}

            burst = completion_bursts(http, args.url, body, args.in_flight)
            estimate = await probe_counter_lag(burst, counter.read_j, idle_w, bursts=args.bursts)
    finally:
        counter.close()
    return {
        "command": "python benchmarks/counter_lag.py " + " ".join(sys.argv[1:]),
        "idle_power_w": idle_w,
        "lag_s": estimate.lag_s,
        "meter_lag_s": estimate.meter_lag_s,  # what to tell ecobatch (energy.counter_lag_s: 0-5 s)
        "rise_delays_s": estimate.rise_delays_s,
        "fall_delays_s": estimate.fall_delays_s,
        "burst": {
            "in_flight": args.in_flight,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the vLLM server")
    parser.add_argument("--counter", default="nvml", help="nvml, or dcgm=URL")
    parser.add_argument("--bursts", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(main(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"counter lag {1000 * result['lag_s']:.0f} ms (idle {result['idle_power_w']:.1f} W)")

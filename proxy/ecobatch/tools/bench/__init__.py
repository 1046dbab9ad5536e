"""``ecobatch bench``: an open-loop load generator speaking the OpenAI API.

The same seeded arrival sequence (``workload``) goes to each target in turn (``--url``, then
``--compare``), open loop (``client``); energy is read for each phase (``energy``); the report gives
throughput, latency, TTFT and inter-token latency (overall and per tier), errors by status, J/request
and J/1k tokens (``report``), as a table, a JSON file and a PNG.

For comparisons that hold up: ``--window-s`` reads every target's energy over the same wall-clock
window from its first arrival (idle included: a target that answers sooner idles the rest of it);
``--repeats N`` runs the targets N times, the order reversed every other round; each target's prompts
start with a word of its own (no target reuses another's cached prefixes in vLLM); ``--warmup-s``
sends the first seconds of the arrivals to each target before its measured phase and leaves them out
of every figure; ``--records``
writes one JSON line per request, with its energy receipt where the target is ecobatch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from ...domain import Tier
from ...energy.counters import CounterDeltas, CounterReader
from .client import Outcome, run_arrivals
from .conditions import code, gpu_states
from .energy import counter_for, ecobatch_energy, is_ecobatch, receipts
from .report import plot, summarise, table
from .workload import Arrival, bursty, diurnal, parse_lengths, poisson, read_trace, with_tiers

__all__ = ["add_arguments", "bench", "build_arrivals", "run_cli"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the target: an ecobatch proxy or a vLLM server (base URL)")
    p.add_argument("--compare", action="append", default=[], help="another target for the same arrivals")
    p.add_argument("--label", action="append", default=[], help="names for the targets, in order")
    p.add_argument("--model", help="model name (default: the target's first in /v1/models)")
    p.add_argument("--api", choices=["chat", "completions"], default="chat")
    p.add_argument("--stream", action="store_true", help="stream (measures TTFT and inter-token latency)")
    p.add_argument(
        "--arrivals",
        choices=["poisson", "bursty", "diurnal", "trace"],
        default="poisson",
        help="diurnal: a day compressed into --duration (a third of --rate at the ends, 5/3 at midday)",
    )
    p.add_argument("--rate", type=float, default=4.0, help="mean requests per second")
    p.add_argument("--on-s", type=float, default=5.0, help="bursty: seconds of each burst")
    p.add_argument("--off-s", type=float, default=5.0, help="bursty: seconds of silence between bursts")
    p.add_argument("--trace", type=Path, help="JSONL: timestamp, prompt_tokens, output_tokens per line")
    p.add_argument(
        "--prompt-tokens",
        default="64",
        help="prompt length in words (a word is 1-2 tokens in a 32k vocabulary; the report gives the "
        "server's count): N, uniform:A-B, choice:A,B,… or lognormal:MEDIAN,SIGMA,MAX",
    )
    p.add_argument(
        "--output-tokens",
        default="choice:16,32,64,128,256,512",
        help="N, uniform:A-B, choice:A,B,… or lognormal:MEDIAN,SIGMA,MAX (heavy-tailed)",
    )
    p.add_argument("--duration", type=float, help="seconds of arrivals")
    p.add_argument("--requests", type=int, help="number of requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--flex-share",
        type=float,
        default=0.0,
        help="share of requests sent with service_tier=flex (drawn with the seed; default 0)",
    )
    p.add_argument(
        "--service-tier",
        choices=["default", "priority"],
        default="default",
        help="the tier of the other requests (default: none sent, the API's default)",
    )
    p.add_argument(
        "--window-s",
        type=float,
        help="read each target's energy over this many seconds from its first arrival (the same window "
        "for every target; it must outlast the last answer)",
    )
    p.add_argument(
        "--steady-s",
        type=_steady_window,
        metavar="FROM:TO",
        help="also read each target's energy from FROM to TO seconds after its first arrival (a "
        "steady-state window inside the arrivals; at equal arrival rates the ratio of its mean power is "
        "the ratio of J/request, without the start and the tail)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds over the targets, the order reversed every other one"
    )
    p.add_argument("--records", type=Path, help="write one JSON line per request here")
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
        "--warmup-s",
        type=float,
        default=0.0,
        help="before each target's measured phase, send it the first SECONDS of the arrivals (as "
        "interactive requests, prompts of their own), wait for them and --cooldown-s; in no figure",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench.json"),
        help="JSON report, bench.json in the current directory unless given (the PNG goes beside it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_arrivals(args: argparse.Namespace) -> list[Arrival]:
    arrivals = _timed_arrivals(args)
    tier: Tier = "priority" if getattr(args, "service_tier", "default") == "priority" else "interactive"
    return with_tiers(arrivals, flex_share=getattr(args, "flex_share", 0.0), tier=tier, seed=args.seed)


def _timed_arrivals(args: argparse.Namespace) -> list[Arrival]:
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
    if args.arrivals == "diurnal":
        return diurnal(
            args.rate, prompt, output, duration_s=args.duration, count=args.requests, seed=args.seed
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


def _steady_window(text: str) -> tuple[float, float]:
    """``FROM:TO`` in seconds, 0 <= FROM < TO."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        message = f"--steady-s {text!r}: give FROM:TO in seconds, e.g. 30:90"
        raise argparse.ArgumentTypeError(message) from None
    if not 0 <= low < high:
        raise argparse.ArgumentTypeError(f"--steady-s {text!r}: needs 0 <= FROM < TO")
    return low, high


async def _steady_energy(
    reader: CounterReader, started: asyncio.Future[float], window: tuple[float, float]
) -> dict[str, float]:
    """Joules and mean watts between ``window`` seconds after the phase's start."""
    start = await started
    deltas = CounterDeltas()
    await asyncio.sleep(max(0.0, start + window[0] - time.monotonic()))
    deltas.rebase(await reader.read())
    await asyncio.sleep(max(0.0, start + window[1] - time.monotonic()))
    joules = deltas.delta(await reader.read())
    span_s = window[1] - window[0]
    return {"from_s": window[0], "to_s": window[1], "joules": joules, "mean_power_w": joules / span_s}


async def bench(
    targets: list[tuple[str, str]], arrivals: list[Arrival], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[list[Outcome]]]:
    """One phase per target in the order given; each target's prompts start with a word of its own."""
    reader, source = counter_for(args.energy)
    summaries, all_outcomes = [], []
    window_s = getattr(args, "window_s", None)
    steady_s: tuple[float, float] | None = getattr(args, "steady_s", None)
    try:
        for n, (label, url) in enumerate(targets):
            if n:
                await asyncio.sleep(args.cooldown_s)
            model = args.model or await _first_model(url, args.api_key)
            ecobatch = await is_ecobatch(url)
            warmup = await _warm_up(url, label, model, ecobatch, arrivals, args)
            snapshot = await ecobatch_energy(url, None, 0) if ecobatch else None
            gpus_before = await asyncio.to_thread(gpu_states)
            deltas = CounterDeltas()
            await _read(reader, deltas)
            started: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            steady = None
            if reader is not None and steady_s is not None:
                steady = asyncio.create_task(_steady_energy(reader, started, steady_s))
            try:
                outcomes, start, end = await _send(
                    url, arrivals, args, model=model, label=label, seed=args.seed, salt=f"t{_salt(label)}",
                    progress=not args.quiet, on_start=started.set_result,
                )  # fmt: skip
            except BaseException:
                if steady is not None:
                    steady.cancel()
                raise
            energy: dict[str, Any] = {"source": source}
            if steady is not None:
                energy["steady"] = await steady
            if window_s is not None:  # the same window for every target, idle included
                energy["window_s"] = window_s
                energy["window_outlasted"] = end - start <= window_s
                await asyncio.sleep(max(0.0, start + window_s - time.monotonic()))
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
                # each request's receipt, read once the phase's requests have settled (or the wait ran out)
                answered = [(o, o.request_id) for o in outcomes if o.status == 200 and o.request_id]
                got = await receipts(url, [request_id for _, request_id in answered], args.api_key)
                for o, request_id in answered:
                    o.receipt = got[request_id]
            summary = summarise(label, url, outcomes, start, end, energy)
            if warmup is not None:
                summary["warmup"] = warmup
            # the GPUs' clocks, temperature and power limit around the phase (NVML; [] without a GPU)
            summary["gpus"] = {"start": gpus_before, "end": await asyncio.to_thread(gpu_states)}
            summaries.append(summary)
            all_outcomes.append(outcomes)
    finally:
        if reader is not None:
            await reader.close()
    return summaries, all_outcomes


async def _send(
    url: str,
    arrivals: list[Arrival],
    args: argparse.Namespace,
    *,
    model: str,
    label: str,
    seed: int,
    salt: str,
    progress: bool = False,
    on_start: Callable[[float], None] | None = None,
) -> tuple[list[Outcome], float, float]:
    """``arrivals`` to ``url`` as the command line says (API, streaming, EOS, key, timeout)."""
    return await run_arrivals(
        url,
        arrivals,
        model=model,
        api=args.api,
        stream=args.stream,
        ignore_eos=not args.no_ignore_eos,
        api_key=args.api_key,
        timeout_s=args.timeout_s,
        seed=seed,
        label=label,
        progress=progress,
        salt=salt,
        on_start=on_start,
    )


async def _warm_up(
    url: str, label: str, model: str, ecobatch: bool, arrivals: list[Arrival], args: argparse.Namespace
) -> dict[str, Any] | None:
    """The first ``--warmup-s`` seconds of the arrivals, sent to the target before its measured phase:
    interactive (no flex request waits out its budget here), prompts of their own (nothing of them is
    cached for the phase), answers awaited, then settled in ecobatch's counters (so the phase's snapshot
    is taken after them) and ``--cooldown-s`` of rest. None without a warm-up."""
    warmup_s = getattr(args, "warmup_s", 0.0)
    if warmup_s <= 0:
        return None
    warm = [replace(a, tier="interactive") for a in arrivals if a.at_s < warmup_s]
    snapshot = await ecobatch_energy(url, None, 0) if ecobatch else None
    outcomes, start, end = await _send(
        url, warm, args, model=model, label=f"{label} (warm-up)", seed=args.seed + 1, salt=f"w{_salt(label)}"
    )
    ok = sum(1 for o in outcomes if o.status == 200)
    if snapshot is not None:
        await ecobatch_energy(url, snapshot, ok)
    await asyncio.sleep(args.cooldown_s)
    return {"seconds": warmup_s, "requests": len(warm), "ok": ok, "took_s": end - start}


def _salt(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()[:6]


def _rounds(targets: list[tuple[str, str]], repeats: int) -> list[list[tuple[str, str]]]:
    """``repeats`` rounds over the targets, the order reversed every other round."""
    return [targets if r % 2 == 0 else targets[::-1] for r in range(repeats)]


def _ratio_interval(values: list[float]) -> dict[str, float | None]:
    """Mean and a 95 % confidence interval (Student's t) of per-round ratios."""
    t95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95_low": None, "ci95_high": None}
    half = t95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}


def _write_records(
    path: Path, rounds: list[list[dict[str, Any]]], outcomes: list[list[list[Outcome]]]
) -> None:
    with path.open("w") as f:
        for r, (summaries, phase_outcomes) in enumerate(zip(rounds, outcomes, strict=True)):
            for summary, outs in zip(summaries, phase_outcomes, strict=True):
                for o in outs:
                    record = {
                        "round": r,
                        "target": summary["label"],
                        "arrival_s": round(o.sent_s, 4),
                        "tier": o.tier,
                        "served_tier": o.served_tier,
                        "status": o.status,
                        "prompt_tokens": o.prompt_tokens,
                        "completion_tokens": o.completion_tokens,
                        "latency_s": round(o.latency_s, 4),
                        "ttft_s": None if o.ttft_s is None else round(o.ttft_s, 4),
                        "request_id": o.request_id,
                        "error": o.error,
                        **_receipt_fields(o.receipt),
                    }
                    f.write(json.dumps(record) + "\n")


def _receipt_fields(receipt: dict[str, Any] | None) -> dict[str, Any]:
    """A record's receipt columns: ecobatch's charge (energy above idle while in flight, its share),
    the base share, what the split rests on, and the receipt's status (None: not an ecobatch target)."""
    receipt = receipt or {}
    return {
        "receipt_status": receipt.get("status"),
        "receipt_joules": receipt.get("energy_joules"),
        "receipt_base_joules": receipt.get("base_energy_joules"),
        "receipt_basis": receipt.get("basis"),
        "receipt_marginal_joules": receipt.get("marginal_energy_joules"),
        "receipt_source": receipt.get("source"),
    }


def run_cli(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be >= 1")
    if not args.warmup_s >= 0:  # NaN too
        raise ValueError(f"--warmup-s={args.warmup_s} must be >= 0")
    if not args.cooldown_s >= 0:
        raise ValueError(f"--cooldown-s={args.cooldown_s} must be >= 0")
    steady_s = getattr(args, "steady_s", None)
    if steady_s is not None and (args.window_s is None or steady_s[1] > args.window_s):
        raise ValueError(f"--steady-s ends at {steady_s[1]} s: give --window-s of at least that much")
    arrivals = build_arrivals(args)
    urls = [args.url.rstrip("/"), *(u.rstrip("/") for u in args.compare)]
    labels = args.label + [f"target {i + 1}" for i in range(len(args.label), len(urls))]
    targets = list(zip(labels, urls, strict=True))
    rounds: list[list[dict[str, Any]]] = []
    round_outcomes: list[list[list[Outcome]]] = []
    for order in _rounds(targets, args.repeats):
        summaries, outcomes = asyncio.run(bench(order, arrivals, args))
        by_label = {s["label"]: (s, o) for s, o in zip(summaries, outcomes, strict=True)}
        rounds.append([by_label[label][0] for label, _ in targets])
        round_outcomes.append([by_label[label][1] for label, _ in targets])
        if len(rounds) < args.repeats:
            time.sleep(args.cooldown_s)
    report: dict[str, Any] = {
        "command": getattr(args, "command_line", None),
        "code": code(),
        "workload": {
            "arrivals": args.arrivals,
            "rate_per_s": args.rate if args.arrivals != "trace" else None,
            "requests": len(arrivals),
            "span_s": arrivals[-1].at_s if arrivals else 0.0,
            "prompt_tokens": args.prompt_tokens if args.arrivals != "trace" else "trace",
            "output_tokens": args.output_tokens if args.arrivals != "trace" else "trace",
            "flex_share": args.flex_share,
            "service_tier": args.service_tier,
            "api": args.api,
            "stream": args.stream,
            "seed": args.seed,
            "window_s": args.window_s,
            "warmup_s": args.warmup_s,
            "repeats": args.repeats,
            "orders": [[label for label, _ in order] for order in _rounds(targets, args.repeats)],
        },
        "targets": rounds[0],
    }
    if args.repeats > 1:
        report["rounds"] = rounds
    if len(targets) > 1:
        report["versus_first"] = _versus_first(rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if args.records is not None:
        _write_records(args.records, rounds, round_outcomes)
        print(f"wrote {args.records}")
    for r, summaries in enumerate(rounds):
        if args.repeats > 1:
            print(f"round {r + 1} (order: {', '.join(report['workload']['orders'][r])})")
        print(table(summaries))
    for label, measures in report.get("versus_first", {}).items():
        for name, interval in measures.items():
            print(f"{name} of {label} / {labels[0]}: {_fmt_interval(interval)}")
    print(f"wrote {args.out}")
    try:
        print(f"wrote {plot(rounds[0], round_outcomes[0], args.out.with_suffix('.png'))}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'ecobatch[bench]')")
    return 0


def _versus_first(rounds: list[list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Each target over the first target, round by round, mean and 95 % interval: J/request, and the mean
    power of the steady window where one was read (``--steady-s``)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for k in range(1, len(rounds[0])):
        measures: dict[str, dict[str, float | None]] = {}
        for name, read in (("joules_per_request", _per_request), ("steady_mean_power", _steady_power)):
            ratios = []
            for summaries in rounds:
                first, other = read(summaries[0]), read(summaries[k])
                if first and other is not None:
                    ratios.append(other / first)
            if ratios:
                measures[name] = {**_ratio_interval(ratios), "rounds": len(ratios)}
        if measures:
            out[rounds[0][k]["label"]] = measures
    return out


def _per_request(summary: dict[str, Any]) -> float | None:
    value = summary["energy"].get("joules_per_request")
    return None if value is None else float(value)


def _steady_power(summary: dict[str, Any]) -> float | None:
    steady = summary["energy"].get("steady")
    return None if steady is None else float(steady["mean_power_w"])


def _fmt_interval(interval: dict[str, float | None]) -> str:
    low, high = interval["ci95_low"], interval["ci95_high"]
    text = f"{interval['mean']:.3f}"
    return text if low is None or high is None else f"{text} (95 % CI {low:.3f}-{high:.3f})"

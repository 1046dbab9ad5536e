"""A bounded soak: open-loop Poisson load on a proxy (a child process, so its memory can be read), for
a fixed time, at a multiple of what its engine can serve. Every request must be answered (served, or
shed with 429/503); none may be lost or hang. Reports memory after warm-up and at the end, and the
event loop's lag from the proxy's own histogram. Loopback only; it stops by itself.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from ..exposition import samples
from .servers import Proc

__all__ = ["rss_bytes", "soak"]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def lag_quantile_s(metrics_text: str, q: float) -> float:
    """A quantile of ``ecobatch_event_loop_lag_seconds`` from its buckets (upper bound of the bucket)."""
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for _, s in samples(metrics_text, ("ecobatch_event_loop_lag_seconds_bucket",))
    )
    total = buckets[-1][1] if buckets else 0.0
    for upper, count in buckets:
        if total and count >= q * total:
            return upper
    return float("nan")


async def soak(
    proxy: Proc,
    *,
    seconds: float,
    rate_per_s: float,
    max_tokens: int,
    warmup_s: float,
    client_timeout_s: float = 120.0,
    seed: int = 0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    url = f"{proxy.url}/v1/completions"
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    rss: dict[str, int] = {}
    body = {"prompt": "soak test", "max_tokens": max_tokens, "ignore_eos": True}

    async def one(session: aiohttp.ClientSession) -> None:
        t0 = time.monotonic()
        try:
            async with session.post(url, json=body) as resp:
                await resp.read()
                statuses[str(resp.status)] += 1
                if resp.status == 200:
                    latencies.append(time.monotonic() - t0)
        except TimeoutError:
            statuses["hung"] += 1
        except aiohttp.ClientError as exc:
            statuses[f"lost: {type(exc).__name__}"] += 1

    timeout = aiohttp.ClientTimeout(total=client_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        start = time.monotonic()
        next_s = start
        while next_s - start < seconds:
            await asyncio.sleep(max(0.0, next_s - time.monotonic()))
            tasks.append(asyncio.create_task(one(session)))
            if "warm" not in rss and time.monotonic() - start >= warmup_s:
                rss["warm"] = rss_bytes(proxy.proc.pid)
            next_s += rng.expovariate(rate_per_s)
        await asyncio.gather(*tasks)
        rss["end"] = rss_bytes(proxy.proc.pid)
        async with session.get(f"{proxy.url}/metrics") as resp:
            metrics_text = await resp.text()
    sent = len(tasks)
    served = statuses["200"]
    shed = statuses["429"] + statuses["503"]
    return {
        "seconds": seconds,
        "rate_per_s": rate_per_s,
        "sent": sent,
        "served": served,
        "shed": shed,
        "statuses": dict(statuses),
        "lost_or_hung": sent - served - shed,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else None,
        "rss_after_warmup_bytes": rss.get("warm"),
        "rss_end_bytes": rss["end"],
        "rss_growth": (rss["end"] / rss["warm"] - 1.0) if rss.get("warm") else None,
        "event_loop_lag_p99_s": lag_quantile_s(metrics_text, 0.99),
        "event_loop_lag_max_bucket_s": lag_quantile_s(metrics_text, 1.0),
    }

"""Small, named workloads shared by the integration tests and the benchmarks.

``short_beside_long``: short chat requests sent at the same instant as long ones, to a target straight
and through ecobatch, alternating rounds, so that both see the same machine state. Through a proxy
whose engine contract is batch-in/batch-out, a short request waits for its longest batchmate; through
a per-request gate it must not.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp

from ..engines import upstream_http

__all__ = ["short_beside_long"]


async def _chat(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there, how are you today"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            text = await resp.text()
    except aiohttp.ClientError as exc:  # say which target failed: the caller sends to several
        raise RuntimeError(f"{url}: {type(exc).__name__}: {exc}") from exc
    if resp.status != 200:
        raise RuntimeError(f"{url} answered {resp.status}: {text[:300]}")
    return time.perf_counter() - t0


async def short_beside_long(
    targets: dict[str, str],
    *,
    model: str = "tiny",
    n_short: int = 8,
    n_long: int = 8,
    short_tokens: int = 4,
    long_tokens: int = 200,
    rounds: int = 3,
) -> dict[str, Any]:
    """Latencies (seconds) per target: ``{name: {"short": [...], "long": [...], medians}}``. Each round
    sends ``n_short`` requests of ``short_tokens`` and ``n_long`` of ``long_tokens`` at once, to each
    target in turn."""
    latencies: dict[str, dict[str, list[float]]] = {name: {"short": [], "long": []} for name in targets}
    async with upstream_http.session() as session:
        for _ in range(rounds):
            for name, url in targets.items():
                results = await asyncio.gather(
                    *(_chat(session, url, model, short_tokens) for _ in range(n_short)),
                    *(_chat(session, url, model, long_tokens) for _ in range(n_long)),
                )
                latencies[name]["short"] += results[:n_short]
                latencies[name]["long"] += results[n_short:]
    return {
        name: {
            "short_median_s": statistics.median(lat["short"]),
            "long_median_s": statistics.median(lat["long"]),
            "short_s": lat["short"],
            "long_s": lat["long"],
        }
        for name, lat in latencies.items()
    }

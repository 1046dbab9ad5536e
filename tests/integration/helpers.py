"""Shared helpers for integration tests: Prometheus text parsing and SSE reading."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ecobatch.testing.sim_vllm import SimVllm

#: modelled vLLM replicas (the ``sims`` fixture): their servers, runners, ports and the dcgm port
Sims = tuple[list[SimVllm], list[web.AppRunner], list[int], int]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 10.0) -> Any:
    """Await ``check()`` every 10 ms until it returns something truthy, and return that; fail naming
    ``what`` after ``timeout_s`` (a bound, not a pace: the usual wait is milliseconds)."""
    deadline = time.monotonic() + timeout_s
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.01)
    return result


async def metric_of(client: Any, name: str, **labels: str) -> float:
    """``metric`` on the app's /metrics now."""
    return metric(await (await client.get("/metrics")).text(), name, **labels)


def serve_in_thread(app: Any) -> str:
    """Run an aiohttp app (``web.Application``) in a daemon thread on a free port; return its URL
    once /health answers 200 (for CLI tests that run their own event loop)."""
    import threading
    import time
    import urllib.request

    from aiohttp import web

    from ecobatch.testing.servers import free_port

    port = free_port()
    kwargs = {"port": port, "print": None, "handle_signals": False}
    threading.Thread(target=web.run_app, args=(app,), kwargs=kwargs, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the app on {url} did not come up")


def gauge(text: str, name: str) -> float:
    """Sum of the unlabelled-or-labelled samples of one gauge, read from the lines that name it.

    Cheap on purpose: while vLLM's CPU engine spins on every core, a full parse of its ~50 KB
    /metrics page took this process 0.7 s, long enough to miss whole requests when polling."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sse_events(raw: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded except the final ``[DONE]``."""
    events: list[Any] = []
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def openai_chat_and_stream(client: Any, model: str, max_tokens: int) -> tuple[Any, Any]:
    """A chat completion and a streamed one (usage included) through the official openai client:
    returns (the completion, the stream's usage)."""
    chat = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
    )
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    return chat, usage


async def sent(client: Any, n: int) -> list[tuple[int, str]]:
    """(status, request id) of ``n`` requests sent at once."""

    async def one() -> tuple[int, str]:
        resp = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8})
        await resp.read()
        return int(resp.status), resp.headers["X-Ecobatch-Request-Id"]

    return list(await asyncio.gather(*(one() for _ in range(n))))


def changing_replicas_settings(source: dict[str, object], dcgm_port: int, **more: object) -> Any:
    """Settings of a vllm-http proxy whose replicas come and go (``source``: a ``backend.replicas_file``
    or ``backend.replicas_dns`` setting), polled fast, energy from the modelled dcgm-exporter."""
    from ecobatch.config import load_settings

    return load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            **source,
            "backend.replicas_refresh_s": 0.05,
            "backend.headroom_poll_s": 0.1,
            "backend.startup_timeout_s": 30,
            "energy.dcgm_url": f"http://127.0.0.1:{dcgm_port}/metrics",
            "energy.idle_power_w": 121.8,
            "energy.sample_interval_s": 0.05,
            "batching.interactive_budget_ms": 0,
            **more,
        },
    )

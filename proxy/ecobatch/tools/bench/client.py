"""Send the arrivals to one target, open loop: each request leaves at its own time, whatever the
answers before it are doing; measure each one (end-to-end latency; for streams, time to the first
token and the gaps between tokens)."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ...engines import upstream_http
from .workload import Arrival, prompt_text

__all__ = ["Outcome", "run_arrivals"]


@dataclass(slots=True)
class Outcome:
    sent_s: float
    status: int  # HTTP status; 0 = no answer (connection failed or timed out)
    tier: str = "interactive"
    latency_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    #: the proxy's request id (X-Ecobatch-Request-Id; else the response's id) and the tier it served
    request_id: str | None = None
    served_tier: str | None = None
    #: its energy receipt from ecobatch (``GET /ecobatch/energy/{id}``) read after the phase; None: the
    #: target is not ecobatch, or the request got no id
    receipt: dict[str, Any] | None = None


#: the ``service_tier`` sent for each tier (interactive: none, the API's default)
SERVICE_TIER = {"flex": "flex", "priority": "priority"}


def _body(
    arrival: Arrival, model: str, api: str, stream: bool, ignore_eos: bool, rng: random.Random, salt: str
) -> dict[str, Any]:
    text = prompt_text(arrival.prompt_tokens, rng)
    if salt:  # this target's own first word: no engine reuses another target's cached prefixes
        text = f"{salt} {text}"
    body: dict[str, Any] = {"model": model, "max_tokens": arrival.output_tokens, "temperature": 0}
    if arrival.tier in SERVICE_TIER:
        body["service_tier"] = SERVICE_TIER[arrival.tier]
    if ignore_eos:
        body["ignore_eos"] = True
    if api == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], outcome: Outcome) -> None:
    t0 = time.monotonic()
    try:
        async with session.post(url, json=body) as resp:  # never sent twice: a drop is the target's error
            outcome.status = resp.status
            outcome.request_id = resp.headers.get("X-Ecobatch-Request-Id")
            if not body.get("stream") or resp.status != 200:
                data = await resp.json(content_type=None)
                if resp.status == 200:
                    outcome.request_id = outcome.request_id or data.get("id")
                    outcome.served_tier = data.get("service_tier")
                    usage = data.get("usage") or {}
                    outcome.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    outcome.completion_tokens = int(usage.get("completion_tokens", 0))
                else:
                    outcome.error = str((data or {}).get("error", {}).get("message", ""))[:200]
            else:
                last = None
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    now = time.monotonic()
                    outcome.served_tier = outcome.served_tier or chunk.get("service_tier")
                    outcome.request_id = outcome.request_id or chunk.get("id")
                    if chunk.get("error"):
                        outcome.status, outcome.error = 502, str(chunk["error"].get("message"))[:200]
                    if any(
                        (c.get("delta") or {}).get("content") or c.get("text")
                        for c in chunk.get("choices") or ()
                    ):
                        if outcome.ttft_s is None:
                            outcome.ttft_s = now - t0
                        elif last is not None:
                            outcome.itl_s.append(now - last)
                        last = now
                    if chunk.get("usage"):
                        outcome.prompt_tokens = int(chunk["usage"].get("prompt_tokens", 0))
                        outcome.completion_tokens = int(chunk["usage"].get("completion_tokens", 0))
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        outcome.status, outcome.error = 0, f"{type(exc).__name__}: {exc}"[:200]
    outcome.latency_s = time.monotonic() - t0


async def run_arrivals(
    url: str,
    arrivals: Sequence[Arrival],
    *,
    model: str,
    api: str,
    stream: bool,
    ignore_eos: bool,
    api_key: str | None,
    timeout_s: float,
    seed: int,
    label: str,
    progress: bool = True,
    salt: str = "",
    on_start: Callable[[float], None] | None = None,
) -> tuple[list[Outcome], float, float]:
    """Send every arrival at its time; return the outcomes and the phase's (start, end) on the monotonic
    clock (end = the last answer). ``salt``: a word every prompt of this phase starts with; ``on_start``
    is called with the start, just before the first send."""
    rng = random.Random(seed)
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bodies = [_body(a, model, api, stream, ignore_eos, rng, salt) for a in arrivals]
    outcomes = [Outcome(a.at_s, 0, a.tier) for a in arrivals]
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with upstream_http.session(timeout=timeout, headers=headers) as session:
        start = time.monotonic()
        if on_start is not None:
            on_start(start)
        tasks: list[asyncio.Task[None]] = []
        reporter = asyncio.create_task(_progress(label, outcomes, tasks)) if progress else None
        for arrival, body, outcome in zip(arrivals, bodies, outcomes, strict=True):
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.monotonic()))
            tasks.append(asyncio.create_task(_one(session, f"{url}{path}", body, outcome)))
        await asyncio.gather(*tasks)
        end = time.monotonic()
        if reporter is not None:
            reporter.cancel()
            print(file=sys.stderr)
    return outcomes, start, end


async def _progress(label: str, outcomes: list[Outcome], tasks: list[asyncio.Task[None]]) -> None:
    total = len(outcomes)
    while True:
        done = sum(1 for t in tasks if t.done())
        failed = sum(1 for t, o in zip(tasks, outcomes, strict=False) if t.done() and o.status != 200)
        width = 30
        bar = "#" * (width * done // max(total, 1))
        print(
            f"\r{label}: [{bar:<{width}}] sent {len(tasks)}/{total}, answered {done}, not 200: {failed}",
            end="",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.sleep(0.5)

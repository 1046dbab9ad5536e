"""Where a benchmark reads energy for a target, always labelled:

* ``nvml``: this host's GPUs, NVML's total-energy counter (the GPU must be the target's);
* ``dcgm=URL``: a dcgm-exporter beside the target's GPU;
* the target's own ecobatch ``/metrics``, when the target is ecobatch: what it attributed to requests,
  its idle bucket and other clients' work (``source`` says measured or modelled), and each request's
  receipt (``GET /ecobatch/energy/{id}``) once its requests have settled;
* none.

A counter is read at the first send and after the last answer: joules over the phase, idle included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp

from ...energy.counters import CounterReader, NvmlCounters
from ...energy.dcgm import DcgmCounters
from ...energy.gpu import discover_gpus
from ...exposition import samples

__all__ = ["counter_for", "ecobatch_energy", "is_ecobatch", "receipts"]

_ECOBATCH = (
    "ecobatch_energy_joules_total",
    "ecobatch_idle_energy_joules_total",
    "ecobatch_unattributed_energy_joules_total",
    "ecobatch_request_energy_joules_count",
)


def counter_for(spec: str) -> tuple[CounterReader | None, str]:
    """The reader for ``--energy`` and its label."""
    if spec == "none":
        return None, "none"
    if spec == "nvml":
        gpus = discover_gpus()
        if not gpus:
            raise ValueError("--energy nvml: NVML found no GPU on this host")
        return NvmlCounters(gpus), f"nvml (GPU {'+'.join(str(g.facts.index) for g in gpus)})"
    if spec.startswith("dcgm="):
        url = spec[len("dcgm=") :]
        return DcgmCounters(url), f"dcgm ({url})"
    raise ValueError(f"--energy {spec!r}: give none, nvml or dcgm=URL")


async def is_ecobatch(url: str) -> bool:
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, ValueError, TimeoutError):
            return False
    return isinstance(body, dict) and "engine_shape" in body


async def _ecobatch_sums(url: str) -> dict[str, Any] | None:
    """ecobatch's energy counters summed, or None where its /metrics is not on this port (a 404 when
    ``server.metrics_port`` moves it) or cannot be read."""
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
            if r.status != 200:
                return None
            text = await r.text()
    except aiohttp.ClientError:
        return None
    sums: dict[str, Any] = dict.fromkeys(_ECOBATCH, 0.0)
    sources: set[str] = set()
    for name, sample in samples(text, _ECOBATCH):
        sums[name] += sample.value
        if name == "ecobatch_energy_joules_total":
            sources.add(sample.labels.get("source", "?"))
    sums["sources"] = sorted(sources)
    return sums


async def ecobatch_energy(
    url: str, before: dict[str, Any] | None, served: int, wait_s: float = 30.0
) -> dict[str, Any] | None:
    """ecobatch's own figures over a phase: call with ``before=None`` at its start (returns the
    snapshot), then with the snapshot after it; waits until ``served`` requests have settled. None
    where its /metrics cannot be read on ``url`` (never read as 0 J)."""
    if before is None:
        return await _ecobatch_sums(url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        now = await _ecobatch_sums(url)
        if now is None:
            return None
        settled = now["ecobatch_request_energy_joules_count"] - before["ecobatch_request_energy_joules_count"]
        if settled >= served or loop.time() >= deadline:
            break
        await asyncio.sleep(0.25)
    delta = {k: now[k] - before[k] for k in _ECOBATCH}
    return {
        "sources": now["sources"],
        "attributed_joules": delta["ecobatch_energy_joules_total"],
        "idle_joules": delta["ecobatch_idle_energy_joules_total"],
        "unattributed_joules": delta["ecobatch_unattributed_energy_joules_total"],
        "settled_requests": int(settled),
    }


async def receipts(
    url: str,
    request_ids: Sequence[str],
    api_key: str | None = None,
    *,
    wait_s: float = 30.0,
    poll_s: float = 0.25,
    concurrency: int = 16,
) -> dict[str, dict[str, Any]]:
    """Each request's energy receipt as ecobatch serves it (``GET {url}/ecobatch/energy/{id}``),
    ``concurrency`` at a time; a ``pending`` one is asked again every ``poll_s`` until it settles or
    ``wait_s`` has passed (then it stays ``pending``). A receipt ecobatch does not hold (unknown, or
    pushed out of its store) reads ``{"status": "missing"}``, one that cannot be read ``{"status":
    "unreadable", "error": ...}``: a record never shows a receipt it did not get."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, dict[str, Any]] = {}

    async def one(session: aiohttp.ClientSession, request_id: str) -> None:
        async with gate:
            try:
                async with session.get(f"{url}/ecobatch/energy/{request_id}") as r:
                    if r.status == 404:
                        out[request_id] = {"status": "missing"}
                        return
                    if r.status != 200:
                        out[request_id] = {"status": "unreadable", "error": f"HTTP {r.status}"}
                        return
                    body = await r.json(content_type=None)
                    if not isinstance(body, dict):
                        out[request_id] = {"status": "unreadable", "error": "not a JSON object"}
                        return
                    out[request_id] = body
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                out[request_id] = {"status": "unreadable", "error": f"{type(exc).__name__}: {exc}"[:200]}

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    todo = list(dict.fromkeys(request_ids))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        while True:
            await asyncio.gather(*(one(session, i) for i in todo))
            todo = [i for i in todo if out[i].get("status") == "pending"]
            if not todo or loop.time() >= deadline:
                return out
            await asyncio.sleep(poll_s)

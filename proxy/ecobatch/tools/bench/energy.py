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
    max_poll_s: float = 2.0,
    concurrency: int = 16,
) -> dict[str, dict[str, Any]]:
    """Each request's energy receipt as ecobatch serves it (``GET {url}/ecobatch/energy/{id}``),
    ``concurrency`` at a time. A ``pending`` one is asked again, first after ``poll_s`` and then twice as
    long each time (up to ``max_poll_s``), until it settles or ``wait_s`` has passed; the rounds after the
    first stop at that deadline, and a receipt still pending then, or that could not be read again, keeps
    the last answer it had. A receipt ecobatch does not hold (unknown, or pushed out of its store) reads
    ``{"status": "missing"}``, one that cannot be read ``{"status": "unreadable", "error": ...}``: a
    record never shows a receipt it did not get."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, dict[str, Any]] = {}

    async def one(session: aiohttp.ClientSession, request_id: str) -> None:
        async with gate:
            answer = await _receipt(session, f"{url}/ecobatch/energy/{request_id}")
        if answer.get("status") != "unreadable" or out.get(request_id, {}).get("status") != "pending":
            out[request_id] = answer  # a pending receipt is not replaced by a failed read of it

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    todo = list(dict.fromkeys(request_ids))
    delay_s = poll_s
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in todo))  # every receipt once, however long
        while True:
            todo = [i for i in todo if out[i].get("status") == "pending"]
            left_s = deadline - loop.time()
            if not todo or left_s <= 0:
                return out
            await asyncio.sleep(min(delay_s, left_s))
            delay_s = min(2 * delay_s, max_poll_s)
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.gather(*(one(session, i) for i in todo))
            except TimeoutError:
                return out


async def _receipt(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """One receipt, or what stood in the way of reading it."""
    try:
        async with session.get(url) as r:
            if r.status == 404:
                return {"status": "missing"}
            if r.status != 200:
                return {"status": "unreadable", "error": f"HTTP {r.status}"}
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"status": "unreadable", "error": f"{type(exc).__name__}: {exc}"[:200]}
    if not isinstance(body, dict):
        return {"status": "unreadable", "error": "not a JSON object"}
    return body

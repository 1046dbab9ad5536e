"""Fault injection against a real vLLM server behind ecobatch: the engine killed mid-request, requests
while it is down, the engine restarted, the engine frozen (SIGSTOP) and thawed. Used by the test suite
(assertions) and by ``benchmarks/reliability.py`` (the table).

Each fault yields a row: what every waiter got (HTTP status) and how long after the fault it got it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from ..exposition import samples
from .servers import Proc, engine_env, free_port, start_proxy, start_vllm_server, wait_healthy

__all__ = ["fault_suite"]

LONG = {"prompt": "hello", "max_tokens": 480, "ignore_eos": True}
SHORT = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}


async def _waiters(url: str, body: dict[str, Any], n: int) -> list[tuple[int, float]]:
    """``n`` requests at once: (HTTP status, monotonic time of the answer) each."""

    async def one(session: aiohttp.ClientSession) -> tuple[int, float]:
        try:
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                await resp.read()
                return resp.status, time.monotonic()
        except aiohttp.ClientError:
            return -1, time.monotonic()  # the proxy itself failed the connection: never expected

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        return list(await asyncio.gather(*(one(session) for _ in range(n))))


async def _health_becomes(url: str, status: int, timeout_s: float) -> float:
    """Seconds until the proxy's /health answers ``status``."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - t0 < timeout_s:
            try:
                async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == status:
                        return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url}/health did not answer {status} within {timeout_s} s")


async def _running_reaches(upstream: str, n: int, timeout_s: float = 60.0) -> None:
    """Return once vLLM's own ``num_requests_running`` gauge reads ``n``: the fault then lands
    mid-request however fast the engine is (a fixed sleep let a fast machine finish them first)."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - t0 < timeout_s:
            async with session.get(f"{upstream}/metrics") as resp:
                text = await resp.text()
            if sum(s.value for _, s in samples(text, ("vllm:num_requests_running",))) >= n:
                return
            await asyncio.sleep(0.01)
    raise TimeoutError(f"vLLM at {upstream} did not run {n} requests within {timeout_s} s")


def _row(fault: str, results: list[tuple[int, float]], since: float, note: str = "") -> dict[str, Any]:
    """A row: each waiter's status, and its answer's time after ``since`` (the fault, or the send)."""
    return {
        "fault": fault,
        "statuses": [s for s, _ in results],
        "seconds_after_fault": [round(t - since, 3) for _, t in results],
        "note": note,
    }


async def fault_suite(
    model_dir: Path, log_dir: Path, *, request_timeout_s: float = 5.0
) -> list[dict[str, Any]]:
    """Run every fault against a fresh vLLM server and proxy; return one row per fault."""
    port = free_port()
    server: Proc = start_vllm_server(model_dir, log_dir, port=port, name="vllm-faults")
    procs = [server]
    rows: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(wait_healthy, [server])
        cfg = log_dir / "faults.yaml"
        cfg.write_text(
            f"backend:\n  kind: vllm-http\n  upstream: {server.url}\n"
            f"  request_timeout_s: {request_timeout_s}\n  headroom_poll_s: 0.5\n"
            "  probe_timeout_s: 1.0\n  breaker_failures: 2\n"
            "batching:\n  interactive_budget_ms: 0\n"
        )
        proxy = start_proxy(["--config", str(cfg)], log_dir, name="ecobatch-faults", env=engine_env())
        procs.append(proxy)
        await asyncio.to_thread(wait_healthy, [proxy])
        url = proxy.url
        t0 = time.monotonic()
        rows.append(_row("none (baseline)", await _waiters(url, SHORT, 3), t0))

        pending = asyncio.ensure_future(_waiters(url, LONG, 3))
        await _running_reaches(server.url, 3)
        t0 = time.monotonic()
        server.signal(signal.SIGKILL)
        rows.append(_row("engine killed mid-request (SIGKILL)", await pending, t0))

        down_s = await _health_becomes(url, 503, 30)
        t0 = time.monotonic()
        note = f"/health said upstream_down {down_s:.1f} s after the killed requests were answered"
        rows.append(_row("new requests while the engine is down", await _waiters(url, SHORT, 3), t0, note))

        server.proc.wait()
        t0 = time.monotonic()
        server = start_vllm_server(model_dir, log_dir, port=port, name="vllm-faults-restarted")
        procs.append(server)
        up_s = await _health_becomes(url, 200, 420)
        note = f"ready again {up_s:.1f} s after the engine's restart began, without restarting the proxy"
        t0 = time.monotonic()
        rows.append(_row("engine restarted on the same port", await _waiters(url, SHORT, 3), t0, note))

        pending = asyncio.ensure_future(_waiters(url, LONG, 3))
        await _running_reaches(server.url, 3)
        t0 = time.monotonic()
        server.signal(signal.SIGSTOP)
        fault = f"engine frozen mid-request (SIGSTOP; request_timeout_s={request_timeout_s:g})"
        rows.append(
            _row(
                fault,
                await pending,
                t0,
                "a request's time-out counts from its dispatch, just before the fault",
            )
        )
        await _health_becomes(url, 503, 30)
        t0 = time.monotonic()
        rows.append(_row("new requests while the engine is frozen", await _waiters(url, SHORT, 3), t0))
        t0 = time.monotonic()
        server.signal(signal.SIGCONT)
        up_s = await _health_becomes(url, 200, 60)
        note = f"ready again {up_s:.1f} s after SIGCONT"
        t1 = time.monotonic()
        rows.append(_row("engine thawed (SIGCONT)", await _waiters(url, SHORT, 3), t1, note))
    finally:
        for p in procs:  # the killed server too: its engine-core process may outlive it
            if p.proc.poll() is None:
                p.signal(signal.SIGCONT)
            p.stop()
    return rows

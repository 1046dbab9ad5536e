"""The run-time controller in front of a MODELLED vLLM (``ecobatch.testing.sim_vllm``: continuous batching
at the H200 reference curve's speed, a GPU whose dcgm-style energy counter integrates its power curve),
against the same server sent the same arrivals directly, energy read over the same wall-clock window.

The engine runs in real time, so these are orderings with margins, not figures: interactive traffic is
never worse than going direct at any load (joules and latency), flex traffic gathers and saves, the
controller follows a load step within seconds, short requests beside long ones are not held for them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from ecobatch.config import DEFAULT_PROFILES, load_settings
from ecobatch.exposition import samples
from ecobatch.profile import load_profile
from ecobatch.serving.app import create_app
from ecobatch.testing.servers import free_port
from ecobatch.testing.sim_vllm import SimVllm, serve_replicas
from ecobatch.tools.bench import _receipt_fields, add_arguments, bench, build_arrivals
from ecobatch.tools.bench.client import Outcome
from tests.integration.helpers import metric

#: sequences the modelled engine runs at once: saturation is reached at ~16 req/s of this length mix
MAX_NUM_SEQS = 16
ADMIN = {"Authorization": "Bearer sim-admin"}


@dataclass
class Stack:
    sim: SimVllm
    direct: str
    proxy: str
    dcgm: str


@pytest.fixture
async def stack(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv("ECOBATCH_ADMIN_KEYS", "sim-admin")
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    port, dcgm_port = free_port(), free_port()
    (sim,), runners = await serve_replicas(
        profile, [port], dcgm_port, served_model_name="sim", max_num_seqs=MAX_NUM_SEQS
    )
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.upstream": f"http://127.0.0.1:{port}",
            "backend.headroom_poll_s": 0.2,
            "energy.meter": "model",
            "batching.flex_budget_ms": 4000,
            "batching.load_window_s": 5.0,
        },
    )
    server = await aiohttp_server(create_app(settings))
    yield Stack(
        sim, f"http://127.0.0.1:{port}", str(server.make_url("")).rstrip("/"), f"http://127.0.0.1:{dcgm_port}"
    )
    for runner in runners:
        await runner.cleanup()


def args_for(stack: Stack, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--url", stack.direct, "--quiet", "--cooldown-s", "1", "--energy", f"dcgm={stack.dcgm}/metrics",
         "--prompt-tokens", "16", *argv]
    )  # fmt: skip


async def compare(
    stack: Stack, *argv: str
) -> tuple[dict[str, Any], dict[str, Any], list[Outcome], list[Outcome]]:
    """The same arrivals straight to the modelled vLLM, then through ecobatch: (direct, ecobatch) summaries
    and outcomes, energy over the same window."""
    args = args_for(stack, *argv)
    (direct, proxied), (d_out, p_out) = await bench(
        [("direct", stack.direct), ("ecobatch", stack.proxy)], build_arrivals(args), args
    )
    for summary in (direct, proxied):
        assert summary["ok"] == summary["requests"], summary["first_errors"]
        assert summary["energy"]["window_outlasted"], "the energy window ended before the last answer"
    return direct, proxied, d_out, p_out


def jpr(summary: dict[str, Any]) -> float:
    return float(summary["energy"]["joules_per_request"])


LOADS = {
    # rate, seconds, energy window, lengths, arrivals
    "0.5 req/s": ("0.5", "12", "16", "choice:16,64,256", "poisson"),
    "4 req/s, heavy tail": ("4", "8", "12", "choice:16,16,16,32,32,64,128,512", "poisson"),
    "4 req/s, bursty": ("4", "8", "12", "choice:16,32,64,128,256", "bursty"),
    "saturation (20 req/s)": ("20", "5", "14", "choice:16,32,64,128,256", "poisson"),
}


@pytest.mark.parametrize("load", LOADS)
async def test_interactive_traffic_is_never_worse_than_going_direct(stack: Stack, load: str) -> None:
    """J/request at most 1.03x direct's (the modelled engine runs in real time: the same arrivals sent
    straight to it twice differ by up to ~2 %), p50 at most 0.1 s more."""
    rate, seconds, window, lengths, kind = LOADS[load]
    direct, proxied, _, _ = await compare(
        stack, "--rate", rate, "--duration", seconds, "--window-s", window, "--output-tokens", lengths,
        "--arrivals", kind, "--on-s", "2", "--off-s", "2",
    )  # fmt: skip
    assert jpr(proxied) <= 1.03 * jpr(direct), (jpr(proxied), jpr(direct))
    assert proxied["latency_s"]["p50"] <= direct["latency_s"]["p50"] + 0.1, (
        proxied["latency_s"],
        direct["latency_s"],
    )


async def test_flex_traffic_is_gathered_released_together_and_saves(stack: Stack) -> None:
    """4 req/s, all flex with a 4 s budget: groups of ~16 run together and the GPU idles between them."""
    direct, proxied, _, outcomes = await compare(
        stack, "--rate", "4", "--duration", "12", "--window-s", "20",
        "--output-tokens", "choice:32,64,128,256", "--flex-share", "1",
    )  # fmt: skip
    assert jpr(proxied) <= 0.8 * jpr(direct), (jpr(proxied), jpr(direct))
    assert {o.served_tier for o in outcomes} == {"flex"}
    # every flex request went within its budget (4 s) and was served after it went (~1 s at most)
    assert max(o.latency_s for o in outcomes) < 4.0 + 2.0
    async with aiohttp.ClientSession() as s, s.get(f"{stack.proxy}/metrics") as r:
        text = await r.text()
    assert metric(text, "ecobatch_queue_wait_seconds_count", tier="flex") == len(outcomes)
    assert metric(text, "ecobatch_budget_misses_total", tier="flex") == 0


async def test_short_requests_beside_long_ones_are_not_held_for_them(stack: Stack) -> None:
    """8 long (512 tokens) and 32 short (16 tokens) at once: the short ones finish within 1.5x of going
    direct."""

    async def burst(base: str) -> float:
        async def one(tokens: int) -> float:
            body = {"model": "sim", "prompt": "x", "max_tokens": tokens}
            t0 = asyncio.get_running_loop().time()
            async with aiohttp.ClientSession() as s, s.post(f"{base}/v1/completions", json=body) as r:
                assert r.status == 200
                await r.read()
            return asyncio.get_running_loop().time() - t0

        times = await asyncio.gather(*(one(512) for _ in range(8)), *(one(16) for _ in range(32)))
        return statistics.median(times[8:])

    direct = await burst(stack.direct)
    await asyncio.sleep(3.0)  # the long ones of the first burst end (the engine idles again)
    proxied = await burst(stack.proxy)
    assert proxied <= 1.5 * direct, (proxied, direct)


async def test_the_controller_follows_a_load_step_within_seconds(stack: Stack) -> None:
    """2 -> 12 -> 2 req/s: the arrival rate the controller decides from (GET /ecobatch/batching) reads
    each level within its sliding window (5 s here), with no operator action."""
    views: list[tuple[float, float]] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def watch(stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(headers=ADMIN) as s:
            while not stop.is_set():
                async with s.get(f"{stack.proxy}/ecobatch/batching") as r:
                    view = await r.json()
                views.append((loop.time() - t0, view["load"]["arrival_rate_per_s"]["priority+interactive"]))
                await asyncio.sleep(0.25)

    session = aiohttp.ClientSession()
    sent: list[asyncio.Future[aiohttp.ClientResponse]] = []

    async def send(rate: float, seconds: float) -> None:
        for _ in range(int(rate * seconds)):
            body = {"model": "sim", "prompt": "x", "max_tokens": 32}
            sent.append(asyncio.ensure_future(session.post(f"{stack.proxy}/v1/completions", json=body)))
            await asyncio.sleep(1.0 / rate)

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(stop))
    try:
        await send(2, 6)
        step_up = loop.time() - t0
        await send(12, 6)
        step_down = loop.time() - t0
        await send(2, 8)
        for response in await asyncio.gather(*sent):
            assert response.status == 200
            response.release()
    finally:
        stop.set()
        await watcher
        await session.close()
    before = [r for t, r in views if step_up - 1.5 < t < step_up]
    high = [r for t, r in views if step_up + 5.0 < t < step_down]
    after = [r for t, r in views if t > step_down + 6.0]
    assert before and high and after, views
    assert statistics.fmean(before) < 3.0, before
    assert min(high) > 9.0, high  # within 5 s of the step up it reads 12 req/s (±25 %)
    assert max(after) < 3.5, after  # and within 6 s of the step down, 2 req/s again


async def test_a_warm_up_goes_to_the_target_first_and_is_in_no_figure(stack: Stack) -> None:
    """bench --warmup-s: the first seconds of the arrivals go to the target before its phase, as
    interactive requests; the phase's outcomes and its ecobatch figures are the phase's alone."""
    args = args_for(
        stack, "--url", stack.proxy, "--rate", "40", "--requests", "30", "--output-tokens", "2",
        "--flex-share", "1", "--warmup-s", "0.25", "--cooldown-s", "0",
    )  # fmt: skip
    arrivals = build_arrivals(args)
    warm = sum(1 for a in arrivals if a.at_s < 0.25)
    assert 0 < warm < 30
    (summary,), (outcomes,) = await bench([("eco", stack.proxy)], arrivals, args)
    assert summary["warmup"]["requests"] == summary["warmup"]["ok"] == warm
    assert summary["requests"] == len(outcomes) == summary["ok"] == 30
    assert summary["energy"]["ecobatch"]["settled_requests"] == 30
    # each record carries its receipt: the share and, the profile having an idle power, the marginal
    fields = [_receipt_fields(o.receipt) for o in outcomes]
    assert all(f["receipt_status"] == "settled" and f["receipt_joules"] > 0 for f in fields)
    assert all(f["receipt_marginal_joules"] > 0 for f in fields)
    async with aiohttp.ClientSession() as session, session.get(f"{stack.proxy}/metrics") as r:
        text = await r.text()
    dispatched = {"interactive": 0.0, "flex": 0.0, "priority": 0.0}
    for _, sample in samples(text, ("ecobatch_queue_wait_seconds_count",)):
        dispatched[sample.labels["tier"]] += sample.value
    # the proxy dispatched both: the warm-up as interactive requests, the phase's as flex
    assert dispatched == {"interactive": warm, "flex": 30, "priority": 0}

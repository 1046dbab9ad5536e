"""Two clients on one (modelled) vLLM: ecobatch's requests are charged only their share, another client's
work lands in the other-work bucket (never idle, never on ecobatch's receipts), and idle power is
measured live while nothing runs. The GPU is ``ecobatch.testing.sim_vllm``'s modelled one: its power is
the profile's at the sequences it runs, its idle power the profile's at none."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ecobatch.config import DEFAULT_PROFILES, load_settings
from ecobatch.profile import load_profile
from ecobatch.serving.app import RUNTIME, create_app
from ecobatch.testing.servers import free_port
from ecobatch.testing.sim_vllm import SimVllm, serve_replicas
from tests.integration.helpers import eventually, metric_of

#: the modelled GPU's idle draw once warm: above the profile's, which the start-up probe measures
IDLE_W = 140.0


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimVllm, int, int]]:
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    port, dcgm_port = free_port(), free_port()
    servers, runners = await serve_replicas(profile, [port], dcgm_port, served_model_name="sim")
    yield servers[0], port, dcgm_port
    for runner in runners:
        await runner.cleanup()


async def _proxy(aiohttp_client: Any, port: int, dcgm_port: int) -> Any:
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.upstream": f"http://127.0.0.1:{port}",
            "backend.headroom_poll_s": 0.05,
            "energy.meter": "dcgm",
            "energy.dcgm_url": f"http://127.0.0.1:{dcgm_port}/metrics",
            "energy.sample_interval_s": 0.05,
            "energy.tail_s": 0.2,
            "batching.interactive_budget_ms": 0,
        },
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    runtime = app[RUNTIME]
    await eventually(lambda: _true(runtime.state == "ready"), "the proxy is ready", timeout_s=30)
    return client


async def _true(value: bool) -> bool:
    return value


async def _direct(port: int, n: int, max_tokens: int) -> None:
    """Another client: ``n`` requests straight to vLLM."""
    async with aiohttp.ClientSession() as s:

        async def one() -> None:
            body = {"model": "sim", "prompt": "other", "max_tokens": max_tokens}
            async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                assert r.status == 200
                await r.read()

        await asyncio.gather(*(one() for _ in range(n)))


async def _ours(client: Any, n: int, max_tokens: int) -> list[str]:
    async def one() -> str:
        resp = await client.post("/v1/completions", json={"prompt": "ours", "max_tokens": max_tokens})
        assert resp.status == 200
        await resp.read()
        return str(resp.headers["X-Ecobatch-Request-Id"])

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _settled_joules(client: Any, ids: list[str]) -> float:
    async def all_settled() -> list[float] | None:
        joules = []
        for request_id in ids:
            body = await (await client.get(f"/ecobatch/energy/{request_id}")).json()
            if body["status"] != "settled":
                return None
            # beside its share, what it added: modelled from the profile's power curve, and labelled so
            assert body["marginal_basis"] == "profile power curve and prefill point (modelled)"
            assert body["marginal_energy_joules"] > 0
            joules.append(body["energy_joules"])
        return joules

    return sum(await eventually(all_settled, "the receipts settle", timeout_s=20))


async def _buckets(client: Any) -> dict[str, float]:
    names = {
        "ours": "ecobatch_energy_joules_total",
        "idle": "ecobatch_idle_energy_joules_total",
        "other": "ecobatch_unattributed_energy_joules_total",
    }
    return {k: await metric_of(client, name) for k, name in names.items()}


def _gpu_j(sim: SimVllm) -> float:
    return sim.gpu.energy_mj() / 1000.0


async def test_another_clients_work_is_other_work_and_ours_pays_only_its_share(
    sim: tuple[SimVllm, int, int], aiohttp_client: Any
) -> None:
    server, port, dcgm_port = sim
    client = await _proxy(aiohttp_client, port, dcgm_port)

    async def idle_w() -> float | None:
        watts = await metric_of(client, "ecobatch_idle_power_watts")
        return watts or None  # no interval split yet

    started_w = await eventually(idle_w, "the first interval is split")
    assert started_w == pytest.approx(server.gpu.idle_power_w, abs=0.5), "measured at start-up"

    # the GPU's idle draw rises after start-up: the idle power follows it while nothing runs
    server.gpu.set_idle_power_w(IDLE_W)

    async def idle_is_live() -> bool:
        return abs(await metric_of(client, "ecobatch_idle_power_watts") - IDLE_W) < 0.5

    await eventually(idle_is_live, "idle power measured live", timeout_s=15)

    # another client alone: its energy above idle is other work, none of it ours or idle
    before, gpu0 = await _buckets(client), _gpu_j(server)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await _direct(port, 4, max_tokens=300)
    await asyncio.sleep(0)  # nothing to wait for: the next check waits on the meter
    t1 = loop.time()
    gpu_above_idle = (_gpu_j(server) - gpu0) - IDLE_W * (t1 - t0)

    async def others_counted() -> dict[str, float] | None:
        after = await _buckets(client)
        other = after["other"] - before["other"]
        return after if other >= 0.9 * gpu_above_idle else None

    after = await eventually(others_counted, "the other client's energy lands in other work")
    assert after["ours"] == before["ours"], "none of ecobatch's requests ran"
    # and no more than it: the meter has passed the other client's end, and idle is not counted twice
    assert after["other"] - before["other"] <= 1.1 * gpu_above_idle + IDLE_W * 0.5

    # both at once, the same work each: ecobatch's receipts carry about half of the energy above idle
    before, gpu0, t0 = await _buckets(client), _gpu_j(server), loop.time()
    other = asyncio.create_task(_direct(port, 4, max_tokens=400))
    ids = await _ours(client, 4, max_tokens=400)
    await other
    ours_j = await _settled_joules(client, ids)
    after = await _buckets(client)
    shared = (after["ours"] - before["ours"]) + (after["other"] - before["other"])
    assert 0.35 <= ours_j / shared <= 0.65, f"ours {ours_j:.0f} J of {shared:.0f} J above idle"

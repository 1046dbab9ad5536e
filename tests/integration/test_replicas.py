"""Several vLLM replicas behind one proxy, against MODELLED vLLM servers (``ecobatch.testing.sim_vllm``:
continuous batching at the H200 reference profile's speed, GPUs whose dcgm-style energy counters
integrate its power curve): pack routing, round-robin, per-replica energy with the idle replica's
joules reported, ejection of a replica that stops answering and its recovery, start-up with a replica
missing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from ecobatch.config import DEFAULT_PROFILES, load_settings
from ecobatch.profile import load_profile
from ecobatch.serving.app import RUNTIME, create_app
from ecobatch.testing.servers import free_port
from ecobatch.testing.sim_vllm import SimVllm, serve_replicas
from tests.integration.helpers import Sims, eventually


async def proxy(
    aiohttp_client: Any,
    ports: list[int],
    dcgm_port: int,
    routing: str = "pack",
    gpus: list[str] | None = None,
) -> Any:
    """ecobatch over replicas on ``ports``; replica i's energy is the sim GPU ``gpus[i]`` (default: i)."""
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.replicas": [
                {"url": f"http://127.0.0.1:{port}", "dcgm_labels": {"gpu": gpu}}
                for port, gpu in zip(ports, gpus or [str(i) for i in range(len(ports))], strict=True)
            ],
            "backend.routing": routing,
            "backend.headroom_poll_s": 0.1,
            "backend.probe_timeout_s": 0.5,
            "backend.startup_timeout_s": 30,
            "energy.dcgm_url": f"http://127.0.0.1:{dcgm_port}/metrics",
            "energy.idle_power_w": 121.8,  # the profile's: no 1 s idle probe per replica
            "energy.sample_interval_s": 0.05,
            "batching.interactive_budget_ms": 20,
        },
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    runtime = app[RUNTIME]
    for _ in range(300):
        if runtime.state == "ready":
            break
        await asyncio.sleep(0.05)
    assert runtime.state == "ready", runtime.reason
    return client


async def complete(client: Any, n: int, max_tokens: int = 24) -> list[int]:
    async def one() -> int:
        resp = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": max_tokens})
        await resp.read()
        return int(resp.status)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def metric(client: Any, name: str, **labels: str) -> float:
    from ecobatch.exposition import samples

    text = await (await client.get("/metrics")).text()
    return sum(
        s.value for n, s in samples(text, (name,)) if all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_pack_runs_a_burst_on_one_replica_and_reports_the_idle_ones_joules(
    sims: Sims, aiohttp_client: Any
) -> None:
    servers, _, ports, dcgm_port = sims
    client = await proxy(aiohttp_client, ports, dcgm_port)
    assert await complete(client, 6) == [200] * 6
    assert servers[0].served == 6 and servers[1].served == 0, "all six fit under r0's cap"
    assert await metric(client, "ecobatch_replica_requests_total", replica="r0") == 6
    runtime = client.app[RUNTIME]
    ledgers = {m.gpu: m.ledger for m in runtime.meters}

    async def metered() -> bool:  # the meters' next intervals: r0's work settled, r1's idle counted
        return ledgers["r0:sim/0"].totals.attributed_joules > 0 and ledgers["r1:sim/1"].totals.idle_joules > 0

    await eventually(metered, "both replicas' meters past the burst")
    assert set(ledgers) == {"r0:sim/0", "r1:sim/1"}
    assert ledgers["r0:sim/0"].totals.attributed_joules > 0
    assert ledgers["r1:sim/1"].totals.attributed_joules == 0, "nothing ran on r1"
    assert ledgers["r1:sim/1"].totals.idle_joules > 0, "the idle replica's power is reported"
    assert await metric(client, "ecobatch_idle_energy_joules_total", gpu="r1:sim/1") > 0


async def test_round_robin_spreads_the_same_burst(sims: Sims, aiohttp_client: Any) -> None:
    servers, _, ports, dcgm_port = sims
    client = await proxy(aiohttp_client, ports, dcgm_port, routing="round-robin")
    assert await complete(client, 6) == [200] * 6
    assert servers[0].served == 3 and servers[1].served == 3


async def test_a_replica_that_stops_answering_is_ejected_and_taken_back_when_it_returns(
    sims: Sims, aiohttp_client: Any
) -> None:
    servers, runners, ports, dcgm_port = sims
    client = await proxy(aiohttp_client, ports, dcgm_port)
    await runners[0].cleanup()  # r0 goes away
    for _ in range(100):
        health = await (await client.get("/health")).json()
        if health["engine"]["replicas"][0]["state"] == "down":
            break
        await asyncio.sleep(0.05)
    assert health["engine"]["replicas"][0]["state"] == "down", health
    assert health["status"] == "ok", "one replica still serves"
    assert await metric(client, "ecobatch_replica_up", replica="r0") == 0
    assert await complete(client, 4) == [200] * 4
    assert servers[1].served == 4, "everything went to the live replica"
    # r0 comes back on its port
    runners[0] = web.AppRunner(servers[0].app(), handler_cancellation=True)
    await runners[0].setup()
    await web.TCPSite(runners[0], "127.0.0.1", ports[0]).start()
    for _ in range(100):
        if await metric(client, "ecobatch_replica_up", replica="r0") == 1:
            break
        await asyncio.sleep(0.05)
    assert await complete(client, 3) == [200] * 3
    assert servers[0].served == 3, "pack prefers the first replica again"


async def test_it_is_ready_with_one_replica_and_takes_the_other_once_it_answers(aiohttp_client: Any) -> None:
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    ports, dcgm_port = [free_port(), free_port()], free_port()
    servers, runners = await serve_replicas(profile, ports[1:], dcgm_port, served_model_name="sim")
    try:
        # the exporter has the running server's GPU as "0"; the late one's ("9") never appears in it
        client = await proxy(aiohttp_client, ports, dcgm_port, gpus=["9", "0"])
        health = await (await client.get("/health")).json()
        assert health["status"] == "ok" and health["engine"]["replicas_up"] == 1
        meters = {m.gpu: m for m in client.app[RUNTIME].meters}
        assert set(meters) == {"r0:dcgm", "r1:sim/0"}, "the late replica's GPUs are not named yet"
        late = health["engine"]["replicas"][0]
        assert late["state"] == "starting" and "connection refused" in late["last_error"]
        assert await complete(client, 2) == [200, 200] and servers[0].served == 2
        first = SimVllm(profile, served_model_name="sim")
        runner = web.AppRunner(first.app(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", ports[0]).start()
        runners.append(runner)
        for _ in range(100):
            health = await (await client.get("/health")).json()
            if health["engine"]["replicas_up"] == 2:
                break
            await asyncio.sleep(0.1)
        assert health["engine"]["replicas_up"] == 2
        assert await complete(client, 2) == [200, 200] and first.served == 2
    finally:
        for r in runners:
            await r.cleanup()


async def test_with_every_replica_down_requests_are_503_naming_each_one(
    sims: Sims, aiohttp_client: Any
) -> None:
    _, runners, ports, dcgm_port = sims
    client = await proxy(aiohttp_client, ports, dcgm_port)
    for runner in runners[:2]:
        await runner.cleanup()
    for _ in range(100):
        health = await (await client.get("/health")).json()
        if health["engine"]["replicas_up"] == 0:
            break
        await asyncio.sleep(0.05)
    assert health["status"] == "upstream_down"
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 503 and resp.headers["Retry-After"]
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_down"
    assert "r0: " in error["message"] and "r1: " in error["message"]


async def test_while_no_replica_has_answered_yet_it_is_not_ready_and_says_why(aiohttp_client: Any) -> None:
    ports = [free_port(), free_port()]
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.replicas": [{"url": f"http://127.0.0.1:{p}"} for p in ports],
            "energy.meter": "model",
        },
    )
    client = await aiohttp_client(create_app(settings, start_in_background=True))

    async def both_tried() -> bool:  # the bring-up has tried each replica once
        reason = str((await (await client.get("/health")).json())["reason"])
        return "r0: waiting for upstream" in reason and "r1: waiting for upstream" in reason

    await eventually(both_tried, "both replicas tried")
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 503
    message = (await resp.json())["error"]["message"]
    assert "r0: waiting for upstream" in message and "r1: waiting for upstream" in message


async def test_the_batching_view_shows_each_replica(
    sims: Sims, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ECOBATCH_ADMIN_KEYS", "sk-admin")
    _, _, ports, dcgm_port = sims
    client = await proxy(aiohttp_client, ports, dcgm_port, routing="round-robin")

    async def polled() -> Any:  # each replica's first headroom poll has answered
        view = await (
            await client.get("/ecobatch/batching", headers={"Authorization": "Bearer sk-admin"})
        ).json()
        polled = all(r["headroom"]["kv_capacity_tokens"] is not None for r in view["replicas"])
        return view if polled else None

    view = await eventually(polled, "a headroom poll of each replica")
    assert view["routing"] == "round-robin"
    assert [r["name"] for r in view["replicas"]] == ["r0", "r1"]
    assert all(r["up"] and r["inflight"] == 0 and r["limited_by"] == "none" for r in view["replicas"])
    assert view["replicas"][0]["headroom"]["kv_capacity_tokens"] == 16384 * 16


def test_two_replicas_reading_the_same_exporter_series_are_refused_before_start_up() -> None:
    """Without per-replica dcgm labels both replicas' meters would read both GPUs: each GPU's joules would
    be charged twice. Seen in the settings: the exporter need not be up."""
    from ecobatch.errors import ConfigError

    with pytest.raises(ConfigError, match="select the same series of dcgm-exporter"):
        load_settings(
            None,
            {
                "backend.kind": "vllm-http",
                "backend.replicas": [{"url": "http://127.0.0.1:1"}, {"url": "http://127.0.0.1:2"}],
                "energy.dcgm_url": "http://127.0.0.1:3/metrics",
            },
        )


async def test_requests_sent_to_a_replica_that_just_died_are_served_by_the_other(
    sims: Sims, aiohttp_client: Any
) -> None:
    """Before any probe notices, a refused connection trips that replica's breaker and the requests go
    to the live one: none fails."""
    servers, runners, ports, dcgm_port = sims
    client = await proxy(aiohttp_client, ports, dcgm_port)
    await runners[0].cleanup()  # r0 is gone; the gate still takes it for up
    assert await complete(client, 4) == [200] * 4
    assert servers[1].served == 4
    assert await metric(client, "ecobatch_replica_requests_total", replica="r0") >= 1, "sent to r0 first"


async def test_a_single_replica_list_works_like_one_upstream(sims: Sims, aiohttp_client: Any) -> None:
    servers, _, ports, dcgm_port = sims
    client = await proxy(aiohttp_client, ports[:1], dcgm_port)
    assert await complete(client, 3) == [200] * 3 and servers[0].served == 3


async def test_replicas_measuring_a_gpu_in_common_are_refused(sims: Sims, aiohttp_client: Any) -> None:
    """r0 measures GPUs 0 and 1 (no selector of its own), r1 GPU 1: GPU 1 would be counted twice."""
    _, _, ports, dcgm_port = sims
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.replicas": [
                {"url": f"http://127.0.0.1:{ports[0]}"},
                {"url": f"http://127.0.0.1:{ports[1]}", "dcgm_labels": {"gpu": "1"}},
            ],
            "energy.dcgm_url": f"http://127.0.0.1:{dcgm_port}/metrics",
            "energy.idle_power_w": 121.8,
        },
    )
    app = create_app(settings, start_in_background=True)
    await aiohttp_client(app)
    runtime = app[RUNTIME]
    for _ in range(100):
        if runtime.state == "failed":
            break
        await asyncio.sleep(0.05)
    assert runtime.state == "failed" and "r0 and r1 both measure GPU sim/1" in runtime.reason


async def test_replicas_that_serve_different_models_are_refused(aiohttp_client: Any) -> None:
    """Without backend.model the first replica up sets the model; one serving another never serves."""
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    ports = [free_port(), free_port()]
    _, first = await serve_replicas(profile, ports[:1], free_port(), served_model_name="sim")
    _, other = await serve_replicas(profile, ports[1:], free_port(), served_model_name="other")
    try:
        settings = load_settings(
            None,
            {
                "backend.kind": "vllm-http",
                "backend.replicas": [{"url": f"http://127.0.0.1:{p}"} for p in ports],
                "energy.meter": "model",
            },
        )
        app = create_app(settings, start_in_background=True)
        client = await aiohttp_client(app)
        runtime = app[RUNTIME]
        for _ in range(100):
            if runtime.state in ("ready", "failed"):
                break
            await asyncio.sleep(0.05)
        if runtime.state == "failed":  # both answered in the same turn of the loop
            assert "serve different models" in runtime.reason
            return
        for _ in range(40):  # the other replica's next try finds its model is not the one served
            health = await (await client.get("/health")).json()
            refused = [r for r in health["engine"]["replicas"] if r["state"] != "up"]
            if refused and "is not served upstream" in (refused[0]["last_error"] or ""):
                break
            await asyncio.sleep(0.1)
        assert health["engine"]["replicas_up"] == 1 and health["model"] in ("sim", "other")
        assert "is not served upstream" in refused[0]["last_error"]
    finally:
        for r in [*first, *other]:
            await r.cleanup()


async def test_replicas_on_two_exporters_may_both_call_their_gpu_0(aiohttp_client: Any) -> None:
    """Two hosts, each with its own dcgm-exporter whose GPU is "0": not the same GPU."""
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    ports, dcgm_ports = [free_port(), free_port()], [free_port(), free_port()]
    runners = []
    for port, dcgm_port in zip(ports, dcgm_ports, strict=True):
        runners += (await serve_replicas(profile, [port], dcgm_port, served_model_name="sim"))[1]
    try:
        settings = load_settings(
            None,
            {
                "backend.kind": "vllm-http",
                "backend.replicas": [
                    {"url": f"http://127.0.0.1:{p}", "dcgm_url": f"http://127.0.0.1:{d}/metrics"}
                    for p, d in zip(ports, dcgm_ports, strict=True)
                ],
                "energy.meter": "dcgm",
                "energy.idle_power_w": 121.8,
            },
        )
        app = create_app(settings)
        client = await aiohttp_client(app)
        assert app[RUNTIME].state == "ready", app[RUNTIME].reason
        assert sorted(m.gpu for m in app[RUNTIME].meters) == ["r0:sim/0", "r1:sim/0"]
        assert await complete(client, 2) == [200, 200]
    finally:
        for r in runners:
            await r.cleanup()

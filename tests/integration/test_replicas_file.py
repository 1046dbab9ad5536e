"""Replicas that come and go: ``backend.replicas_file`` changed while the proxy runs, in front of two
modelled vLLM servers (``ecobatch.testing.sim_vllm``) and their modelled dcgm-exporter."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from ecobatch.config import DEFAULT_PROFILES, load_settings
from ecobatch.errors import ConfigError
from ecobatch.profile import load_profile
from ecobatch.serving.app import RUNTIME, create_app
from ecobatch.testing.servers import free_port
from ecobatch.testing.sim_vllm import dcgm_app, serve_replicas
from tests.integration.helpers import Sims, changing_replicas_settings, eventually, metric_of, sent


def listing(path: Path, ports: list[int], names: str) -> None:
    """The replicas file: of replica ``a`` (GPU 0, the first port) and ``b`` (GPU 1, the second), those
    named in ``names``."""
    chosen = [
        {"url": f"http://127.0.0.1:{port}", "name": name, "dcgm_labels": {"gpu": str(i)}}
        for i, (name, port) in enumerate(zip("ab", ports, strict=True))
        if name in names
    ]
    path.write_text(yaml.safe_dump(chosen))


async def complete(client: Any, n: int) -> list[int]:
    return [status for status, _ in await sent(client, n)]


def settings_over(replicas_file: Path, dcgm_port: int, **more: object) -> Any:
    return changing_replicas_settings({"backend.replicas_file": str(replicas_file)}, dcgm_port, **more)


async def proxy_over(
    aiohttp_client: Any, tmp_path: Path, ports: list[int], dcgm_port: int, names: str, **more: object
) -> tuple[Path, Any, Any]:
    """(the replicas file listing ``names``, a client of ecobatch over it, its runtime)."""
    replicas_file = tmp_path / "replicas.yaml"
    listing(replicas_file, ports, names)
    app = create_app(settings_over(replicas_file, dcgm_port, **more))
    return replicas_file, await aiohttp_client(app), app[RUNTIME]


async def test_a_replica_added_to_the_file_joins_and_one_removed_leaves_without_a_restart(
    sims: Sims, aiohttp_client: Any, tmp_path: Path
) -> None:
    servers, _, ports, dcgm_port = sims
    round_robin = {"backend.routing": "round-robin"}
    replicas_file, client, runtime = await proxy_over(
        aiohttp_client, tmp_path, ports, dcgm_port, "a", **round_robin
    )
    assert [r.name for r in runtime.engine.replicas] == ["a"]
    on_a = await sent(client, 4)
    assert [status for status, _ in on_a] == [200] * 4
    assert (servers[0].served, servers[1].served) == (4, 0)

    listing(replicas_file, ports, "ab")  # b is added

    async def b_joined() -> bool:
        return [r.name for r in runtime.engine.replicas] == ["a", "b"]

    await eventually(b_joined, "replica b joined")
    assert {m.gpu for m in runtime.meters} == {"a:sim/0", "b:sim/1"}
    assert await complete(client, 4) == [200] * 4
    assert servers[1].served > 0, "round-robin sends the joined replica its share"

    listing(replicas_file, ports, "b")  # a is removed

    async def a_left() -> bool:  # out of the pool, its meter closed and out of the runtime's
        return [r.name for r in runtime.engine.replicas] == ["b"] and len(runtime.meters) == 1

    await eventually(a_left, "replica a left")
    served_by_a = servers[0].served
    assert await complete(client, 4) == [200] * 4
    assert servers[0].served == served_by_a, "a replica that left takes no request"
    assert {m.gpu for m in runtime.meters} == {"b:sim/1"}
    assert await metric_of(client, "ecobatch_replica_requests_total", replica="a") == 0  # its series went
    assert await metric_of(client, "ecobatch_gpu_power_watts", gpu="a:sim/0") == 0
    receipts = [runtime.receipts.get(request_id) for _, request_id in on_a]
    assert all(r is not None and r["status"] == "settled" for r in receipts), "a's meter settled its requests"
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok" and health["engine"].get("replicas") is None  # one replica now


async def test_a_replica_still_running_a_request_leaves_once_it_ends(
    sims: Sims, aiohttp_client: Any, tmp_path: Path
) -> None:
    _, _, ports, dcgm_port = sims
    replicas_file, client, runtime = await proxy_over(aiohttp_client, tmp_path, ports, dcgm_port, "ab")
    a, b = runtime.engine.replicas
    long = asyncio.ensure_future(
        client.post("/v1/completions", json={"prompt": "long", "max_tokens": 400})  # ~2 s on the curve
    )

    async def running_on_a() -> bool:
        return a.inflight == 1  # pack: the first replica takes it

    await eventually(running_on_a, "the long request running on a")
    listing(replicas_file, ports, "b")  # a is removed while it runs

    async def leaving() -> bool:
        return a.leaving

    await eventually(leaving, "a leaving")
    assert await complete(client, 2) == [200] * 2
    assert await metric_of(client, "ecobatch_replica_requests_total", replica="b") == 2
    assert (await long).status == 200

    async def a_left() -> bool:  # out of the pool, its meter closed and out of the runtime's
        return runtime.engine.replicas == [b] and a.meter not in runtime.meters

    await eventually(a_left, "a left once its request ended")


async def test_a_replica_serving_another_model_or_an_unreadable_file_changes_nothing(
    sims: Sims, aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, ports, dcgm_port = sims
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    other_port = free_port()
    _, other_runners = await serve_replicas(profile, [other_port], free_port(), served_model_name="other")
    try:
        replicas_file, client, runtime = await proxy_over(aiohttp_client, tmp_path, ports, dcgm_port, "a")
        entries = yaml.safe_load(replicas_file.read_text())
        entries.append({"url": f"http://127.0.0.1:{other_port}", "name": "c", "dcgm_labels": {"gpu": "1"}})
        replicas_file.write_text(yaml.safe_dump(entries))

        async def refused() -> bool:
            return any(
                "replica c" in r.getMessage() and "cannot join" in r.getMessage() for r in caplog.records
            )

        await eventually(refused, "the replica serving another model refused")
        assert "is not served upstream" in caplog.text
        assert [r.name for r in runtime.engine.replicas] == ["a"]

        replicas_file.write_bytes(b"\xff\xfe not yaml: [")

        async def said() -> bool:
            return "the replicas stay as they are" in caplog.text

        await eventually(said, "the unreadable file logged")
        assert [r.name for r in runtime.engine.replicas] == ["a"]
        listing(replicas_file, ports, "ab")  # a good file again: b joins

        async def b_joined() -> bool:
            return [r.name for r in runtime.engine.replicas] == ["a", "b"]

        await eventually(b_joined, "b joined after the file was fixed")
        assert await complete(client, 2) == [200] * 2
    finally:
        for runner in other_runners:
            await runner.cleanup()


def test_a_replicas_file_names_the_file_and_the_entry_in_its_errors(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("- {url: 'ftp://nowhere'}\n")
    with pytest.raises(
        ConfigError, match=r"r\.yaml': entry 0: backend\.replicas\[\]\.url='ftp://nowhere' must be"
    ):
        load_settings(None, {"backend.kind": "vllm-http", "backend.replicas_file": str(bad)})
    bad.write_text("[]\n")
    with pytest.raises(ConfigError, match="must be a non-empty YAML list of replicas"):
        load_settings(None, {"backend.kind": "vllm-http", "backend.replicas_file": str(bad)})
    bad.write_text("- http://h:1/a\n- http://h:1/b\n")  # both named h:1
    with pytest.raises(ConfigError, match=r"two replicas with the same name: \['h:1'\]"):
        load_settings(None, {"backend.kind": "vllm-http", "backend.replicas_file": str(bad)})
    both = {"backend.replicas": [{"url": "http://x:1"}], "backend.replicas_file": str(bad)}
    with pytest.raises(ConfigError, match="both set"):
        load_settings(None, {"backend.kind": "vllm-http", **both})


async def test_a_joined_replica_whose_counter_is_first_read_later_and_names_anothers_gpu_leaves(
    sims: Sims, aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """b is listed with a's GPU (a mistake): joining while the exporter cannot be read, it is let in; once
    its counter is read, it measures a's GPU, and it leaves as a join would have been refused."""
    servers, _, ports, _ = sims
    exporter_down = asyncio.Event()

    @web.middleware
    async def flaky(request: web.Request, handler: Any) -> web.StreamResponse:
        if exporter_down.is_set():
            raise web.HTTPServiceUnavailable()
        response: web.StreamResponse = await handler(request)
        return response

    exporter = dcgm_app([s.gpu for s in servers])
    exporter.middlewares.append(flaky)
    dcgm = await aiohttp_server(exporter)
    replicas_file = tmp_path / "replicas.yaml"
    a = {"url": f"http://127.0.0.1:{ports[0]}", "name": "a", "dcgm_labels": {"gpu": "0"}}
    replicas_file.write_text(yaml.safe_dump([a]))
    app = create_app(settings_over(replicas_file, 0, **{"energy.dcgm_url": str(dcgm.make_url("/metrics"))}))
    client = await aiohttp_client(app)
    runtime = app[RUNTIME]
    assert [m.gpu for m in runtime.meters] == ["a:sim/0"]

    exporter_down.set()
    b = {"url": f"http://127.0.0.1:{ports[1]}", "name": "b", "dcgm_labels": {"gpu": "0"}}  # a's GPU
    replicas_file.write_text(yaml.safe_dump([a, b]))

    async def b_joined() -> bool:
        return [r.name for r in runtime.engine.replicas] == ["a", "b"]

    await eventually(b_joined, "b joined, its GPUs not known yet")
    (b_meter,) = [r.meter for r in runtime.engine.replicas if r.name == "b"]
    assert not b_meter.named
    exporter_down.clear()

    async def b_left() -> bool:
        return [r.name for r in runtime.engine.replicas] == ["a"] and b_meter not in runtime.meters

    await eventually(b_left, "b left once its counter named a's GPU")
    assert "a and b both measure GPU sim/0" in caplog.text
    assert "b leaves (its energy counter could first be read after it joined)" in caplog.text

    async def refused() -> bool:  # still listed: it tries to join again, and is refused at once now
        return any("replica b" in r.getMessage() and "cannot join" in r.getMessage() for r in caplog.records)

    await eventually(refused, "b refused when it tries to join again")
    assert [r.name for r in runtime.engine.replicas] == ["a"]
    assert await complete(client, 2) == [200] * 2

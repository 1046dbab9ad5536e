"""Replicas that come and go: ``backend.replicas_dns``, the addresses of a headless Service's name changing
while the proxy runs, in front of two modelled vLLM servers (``ecobatch.testing.sim_vllm``) on one port of
two loopback addresses, as two pods behind one name, and their modelled dcgm-exporter (each GPU labelled
with its pod). "DNS" is a resolver the test owns and changes."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.profile import load_profile
from ecobatch.serving.app import RUNTIME, create_app
from ecobatch.serving.replica_sources import ReplicasDns
from ecobatch.testing.servers import free_port
from ecobatch.testing.sim_vllm import SimVllm, serve_replicas
from tests.integration.helpers import changing_replicas_settings, eventually, metric_of, sent

NAME = "vllm-headless.llm.svc.cluster.local"
A, B = "127.0.0.1", "127.0.0.2"  # the pods vllm-0 and vllm-1 (GPUs 0 and 1 on the exporter)
NOT_FOUND = socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class Dns:
    """What the name resolves to now (or the error a lookup raises), and each address's reverse name."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.error: OSError | None = None
        self.lookups = 0
        self.reverse_asked: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        assert host == NAME
        self.lookups += 1
        if self.error is not None:
            raise self.error
        return list(self.addresses)

    async def reverse(self, address: str) -> str:
        self.reverse_asked.append(address)
        return {A: f"vllm-0.{NAME}", B: f"vllm-1.{NAME}"}[address]


Engines = tuple[list[SimVllm], int, int]  # the servers, their one port, the exporter's port


@pytest.fixture
async def engines() -> AsyncIterator[Engines]:
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    port, dcgm_port = free_port(), free_port()
    servers, runners = await serve_replicas(
        profile, [port, port], dcgm_port, hosts=[A, B], served_model_name="sim"
    )
    yield servers, port, dcgm_port
    for runner in runners:
        await runner.cleanup()


def proxy(engines: Engines, dns: Dns, **more: object) -> Any:
    _, port, dcgm_port = engines
    dns_source = {"name": NAME, "port": port, "scheme": "http", "dcgm_pod_label": "pod"}
    settings = changing_replicas_settings({"backend.replicas_dns": dns_source}, dcgm_port, **more)
    assert settings.backend.replicas_dns is not None
    source = ReplicasDns(settings.backend.replicas_dns, resolve=dns.resolve, reverse=dns.reverse)
    return create_app(settings, replica_source=source, start_in_background=True)


async def ready(client: Any) -> None:
    async def ok() -> bool:
        return (await client.get("/health")).status == 200

    await eventually(ok, "ecobatch ready")


async def test_an_address_that_appears_joins_and_one_that_goes_leaves_without_a_restart(
    engines: Engines, aiohttp_client: Any
) -> None:
    servers, port, _ = engines
    a, b = f"{A}:{port}", f"{B}:{port}"
    dns = Dns(A)
    client = await aiohttp_client(proxy(engines, dns, **{"backend.routing": "round-robin"}))
    runtime = client.app[RUNTIME]
    await ready(client)
    assert [r.name for r in runtime.engine.replicas] == [a]
    assert runtime.engine.replicas[0].url == f"http://{a}"
    on_a = await sent(client, 4)
    assert [status for status, _ in on_a] == [200] * 4
    assert (servers[0].served, servers[1].served) == (4, 0)

    dns.addresses = [B, A]  # the second pod is ready: its address appears (in any order)

    async def b_joined() -> bool:
        return [r.name for r in runtime.engine.replicas] == [a, b]

    await eventually(b_joined, "the replica at the new address joined")
    # each measures its own pod's GPU, found by the reverse name of its address: vllm-0 is GPU 0
    assert {m.gpu for m in runtime.meters} == {f"{a}:sim/0", f"{b}:sim/1"}
    assert dns.reverse_asked == [A, B]  # once per address: a replica keeps its pod
    assert [status for status, _ in await sent(client, 4)] == [200] * 4
    assert servers[1].served > 0, "round-robin sends the joined replica its share"

    dns.addresses = [B]  # the first pod goes (deleted, or no longer ready)

    async def a_left() -> bool:  # out of the pool, its meter closed and out of the runtime's
        return [r.name for r in runtime.engine.replicas] == [b] and len(runtime.meters) == 1

    await eventually(a_left, "the replica whose address went left")
    served_by_a = servers[0].served
    assert [status for status, _ in await sent(client, 4)] == [200] * 4
    assert servers[0].served == served_by_a, "a replica that left takes no request"
    assert await metric_of(client, "ecobatch_replica_requests_total", replica=a) == 0  # its series went
    assert await metric_of(client, "ecobatch_gpu_power_watts", gpu=f"{a}:sim/0") == 0
    receipts = [runtime.receipts.get(request_id) for _, request_id in on_a]
    assert all(r is not None and r["status"] == "settled" for r in receipts), "a's meter settled its requests"


async def test_a_failed_lookup_is_logged_once_and_changes_nothing(
    engines: Engines, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, port, _ = engines
    dns = Dns(A, B)
    client = await aiohttp_client(proxy(engines, dns))
    runtime = client.app[RUNTIME]
    await ready(client)

    async def both() -> bool:
        return len(runtime.engine.replicas) == 2 and all(r.up for r in runtime.engine.replicas)

    await eventually(both, "both replicas up")
    dns.error = NOT_FOUND  # the name stops resolving (a DNS outage: not "no replica")
    failing_from = dns.lookups

    async def passes() -> bool:  # several passes of the membership, each lookup failing
        return dns.lookups >= failing_from + 5

    await eventually(passes, "five failed lookups")
    assert [status for status, _ in await sent(client, 2)] == [200] * 2
    failures = [r for r in caplog.records if "does not resolve" in r.getMessage()]
    assert len(failures) == 1 and f"backend.replicas_dns.name={NAME!r}" in failures[0].getMessage()
    assert [r.name for r in runtime.engine.replicas] == [f"{A}:{port}", f"{B}:{port}"]
    assert not any(r.leaving for r in runtime.engine.replicas)
    dns.error, dns.addresses = None, [A]  # it answers again, and without the second pod

    async def b_left() -> bool:
        return [r.name for r in runtime.engine.replicas] == [f"{A}:{port}"]

    await eventually(b_left, "the replica at the address gone left once the name resolved again")


async def test_start_up_waits_for_the_name_to_resolve_and_says_so(
    engines: Engines, aiohttp_client: Any
) -> None:
    _, port, _ = engines
    dns = Dns()
    dns.error = NOT_FOUND  # no pod ready yet: a headless Service's name does not resolve
    client = await aiohttp_client(proxy(engines, dns))
    health = await client.get("/health")
    body = await health.json()
    assert health.status == 503 and body["status"] == "starting"

    async def reason() -> str:
        text: str = (await (await client.get("/health")).json())["reason"]
        return text if "does not resolve" in text else ""

    said = await eventually(reason, "/health saying what start-up waits for")
    assert said.startswith(f"waiting for replicas: backend.replicas_dns.name={NAME!r} does not resolve")
    dns.error, dns.addresses = None, [A]
    await ready(client)
    assert [r.name for r in client.app[RUNTIME].engine.replicas] == [f"{A}:{port}"]
    assert [status for status, _ in await sent(client, 2)] == [200] * 2

"""Where replicas that come and go are listed: a file, or a DNS name's addresses (the test's resolver)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import pytest

from ecobatch.config import BackendSettings, ReplicasDnsSettings
from ecobatch.serving.replica_sources import (
    ReplicasDns,
    ReplicasFile,
    SourceFailed,
    pod_of,
    replicas_at,
    source_of,
    system_resolver,
    system_reverse,
)

NAME = "vllm-headless.llm.svc.cluster.local"


class Dns:
    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.error: OSError | None = None
        self.names = {a: f"vllm-{i}.{NAME}" for i, a in enumerate(addresses)}
        self.reverse_asked: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        assert (host, port) == (NAME, 8000)
        if self.error is not None:
            raise self.error
        return list(self.addresses)

    async def reverse(self, address: str) -> str:
        self.reverse_asked.append(address)
        if address not in self.names:
            raise socket.herror(1, "Unknown host")
        return self.names[address]


def dns_settings(**more: object) -> ReplicasDnsSettings:
    return ReplicasDnsSettings(name=NAME, **more)  # type: ignore[arg-type]


# ---- the pure parts ------------------------------------------------------------------------------------


def test_each_address_is_a_replica_named_by_its_address_and_port_at_the_scheme_and_port_set() -> None:
    replicas = replicas_at(dns_settings(port=8001, scheme="https"), ["10.0.0.5", "fd00::7"], {})
    assert [(r.name, r.url, r.dcgm_labels) for r in replicas] == [
        ("10.0.0.5:8001", "https://10.0.0.5:8001", {}),
        ("[fd00::7]:8001", "https://[fd00::7]:8001", {}),
    ]


def test_with_a_pod_label_each_replica_selects_its_pods_gpu_and_one_without_a_known_pod_waits() -> None:
    pods = {"10.0.0.5": "vllm-0"}
    replicas = replicas_at(dns_settings(dcgm_pod_label="pod"), ["10.0.0.5", "10.0.0.6"], pods)
    assert [(r.name, r.dcgm_labels) for r in replicas] == [("10.0.0.5:8000", {"pod": "vllm-0"})]


def test_a_reverse_name_names_its_pod_by_its_first_label() -> None:
    assert pod_of(f"vllm-0.{NAME}", "10.0.0.5") == "vllm-0"
    assert pod_of(f"vllm-1.{NAME}.", "10.0.0.5") == "vllm-1"  # a fully qualified name's final dot
    # an endpoint without a hostname (a Deployment's pod) is named after its address: no pod name
    assert pod_of(f"10-0-0-5.{NAME}", "10.0.0.5") is None
    assert pod_of(f"fd00--7.{NAME}", "fd00::7") is None
    assert pod_of("10.0.0.5", "10.0.0.5") is None


# ---- DNS ---------------------------------------------------------------------------------------------


async def test_the_replicas_are_the_names_addresses_once_each_in_address_order() -> None:
    dns = Dns("10.0.0.10", "10.0.0.9", "10.0.0.10")
    replicas = await ReplicasDns(dns_settings(), dns.resolve, dns.reverse).replicas()
    assert [r.name for r in replicas] == ["10.0.0.9:8000", "10.0.0.10:8000"]
    assert dns.reverse_asked == []  # no pod label: no reverse lookup


async def test_a_lookup_that_fails_or_finds_nothing_says_which_setting_and_why() -> None:
    dns = Dns("10.0.0.5")
    source = ReplicasDns(dns_settings(), dns.resolve, dns.reverse)
    dns.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(SourceFailed, match=rf"backend.replicas_dns.name='{NAME}' does not resolve: Name or"):
        await source.replicas()
    dns.error, dns.addresses = None, []
    with pytest.raises(SourceFailed, match="resolves to no ipv4 address"):
        await source.replicas()
    dns.addresses = ["not-an-address"]
    with pytest.raises(SourceFailed, match="not an address"):
        await source.replicas()


async def test_each_address_is_looked_up_in_reverse_once_while_it_resolves() -> None:
    dns = Dns("10.0.0.5", "10.0.0.6")
    source = ReplicasDns(dns_settings(dcgm_pod_label="pod"), dns.resolve, dns.reverse)
    first = await source.replicas()
    assert [(r.name, r.dcgm_labels) for r in first] == [
        ("10.0.0.5:8000", {"pod": "vllm-0"}),
        ("10.0.0.6:8000", {"pod": "vllm-1"}),
    ]
    assert await source.replicas() == first
    assert dns.reverse_asked == ["10.0.0.5", "10.0.0.6"]
    dns.addresses = ["10.0.0.6"]  # 10.0.0.5's pod went: the address may be another pod's next time
    await source.replicas()
    dns.addresses, dns.names["10.0.0.5"] = ["10.0.0.5", "10.0.0.6"], f"vllm-2.{NAME}"
    again = await source.replicas()
    assert again[0].dcgm_labels == {"pod": "vllm-2"}
    assert dns.reverse_asked == ["10.0.0.5", "10.0.0.6", "10.0.0.5"]


async def test_an_address_whose_pod_is_not_known_is_left_out_said_once_until_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = Dns("10.0.0.5")
    dns.addresses.append("10.0.0.6")  # no reverse name yet
    source = ReplicasDns(dns_settings(dcgm_pod_label="pod"), dns.resolve, dns.reverse)
    with caplog.at_level(logging.WARNING):
        assert [r.name for r in await source.replicas()] == ["10.0.0.5:8000"]
        assert [r.name for r in await source.replicas()] == ["10.0.0.5:8000"]
    waits = [r.getMessage() for r in caplog.records if "10.0.0.6 waits" in r.getMessage()]
    assert len(waits) == 1 and "its reverse lookup failed (Unknown host)" in waits[0]
    dns.names["10.0.0.6"] = f"vllm-1.{NAME}"
    assert [r.name for r in await source.replicas()] == ["10.0.0.5:8000", "10.0.0.6:8000"]


async def test_the_systems_resolver_answers_through_the_event_loop() -> None:
    # localhost is in /etc/hosts: no network
    assert "127.0.0.1" in await system_resolver("ipv4")("localhost", 8000)
    assert await system_reverse("127.0.0.1") == socket.gethostbyaddr("127.0.0.1")[0]

    ticks = 0  # the lookup runs beside the loop, not on it: the loop runs another task meanwhile

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await system_resolver("ipv4")("localhost", 8000)
    ticker.cancel()
    assert ticks >= 1


# ---- a file --------------------------------------------------------------------------------------------


async def test_a_file_is_read_again_once_it_changes_and_an_unreadable_one_says_why(tmp_path: Path) -> None:
    path = tmp_path / "replicas.yaml"
    path.write_text("- http://a:8000\n")
    source = ReplicasFile(str(path))
    assert [r.name for r in await source.replicas()] == ["a:8000"]
    path.write_text("- http://a:8000\n- http://b:8000\n")
    os.utime(path, ns=(1, 1))  # a change the stamp sees whatever the clock's resolution
    assert [r.name for r in await source.replicas()] == ["a:8000", "b:8000"]
    path.write_bytes(b"\xff\xfe not yaml: [")
    with pytest.raises(SourceFailed, match=r"backend.replicas_file='.*replicas.yaml'"):
        await source.replicas()
    with pytest.raises(SourceFailed):  # unchanged, still unreadable: the same answer, not read again
        await source.replicas()
    path.unlink()
    with pytest.raises(SourceFailed, match="cannot be read"):
        await source.replicas()


def test_the_settings_name_the_source() -> None:
    assert source_of(BackendSettings()) is None
    assert isinstance(source_of(BackendSettings(kind="vllm-http", replicas_file="r.yaml")), ReplicasFile)
    dns = BackendSettings(kind="vllm-http", replicas_dns=dns_settings())
    assert isinstance(source_of(dns), ReplicasDns)

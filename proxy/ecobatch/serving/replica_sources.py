"""Where replicas that come and go are listed: a file (``backend.replicas_file``) or a DNS name's
addresses (``backend.replicas_dns``).

A source answers one question, ``await source.replicas()``: the replicas wanted now, each with a name and
a URL that no other has, or ``SourceFailed`` saying why it cannot tell. What follows from the answer is
the membership's (``membership.plan_changes``), the same for both sources; a failure changes nothing.

* ``ReplicasFile``: the YAML file, read again when its modification time or size changes.
* ``ReplicasDns``: the name's addresses of one family, looked up with the event loop's resolver
  (``loop.getaddrinfo``: the system's resolver in a worker thread, so the loop never waits on DNS). One
  replica per address, at ``scheme://address:port`` and named ``address:port`` (the same address, the
  same name). With ``dcgm_pod_label`` each new address is also looked up in reverse
  (``loop.getnameinfo``): a StatefulSet's pod behind its headless Service is
  ``<pod>.<service>.<namespace>.svc.<zone>``, and its pod's name selects its GPU on dcgm-exporter. An
  address whose pod cannot be told is left out until it can (it is not a replica yet, so nothing
  leaves); a replica keeps the pod found for its address while the address resolves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from ..config import BackendSettings, ReplicasDnsSettings, ReplicaSettings, read_replicas_file
from ..errors import ConfigError

__all__ = [
    "ReplicaSource",
    "ReplicasDns",
    "ReplicasFile",
    "Resolve",
    "Reverse",
    "SourceFailed",
    "pod_of",
    "replicas_at",
    "source_of",
    "system_resolver",
    "system_reverse",
]

log = logging.getLogger(__name__)

#: (host, port) -> the addresses it resolves to
Resolve = Callable[[str, int], Awaitable[list[str]]]
#: address -> the name it resolves to in reverse (PTR)
Reverse = Callable[[str], Awaitable[str]]


class SourceFailed(Exception):
    """The source cannot tell which replicas are wanted now (the message says why)."""


class ReplicaSource(Protocol):
    #: the setting it comes from, for logs: ``backend.replicas_file='…'``
    where: str

    async def replicas(self) -> list[ReplicaSettings]:
        """The replicas wanted now (names and URLs unique), or ``SourceFailed``."""
        ...


def source_of(backend: BackendSettings) -> ReplicaSource | None:
    """The source the settings name (None: the replicas are fixed)."""
    if backend.replicas_file is not None:
        return ReplicasFile(backend.replicas_file)
    if backend.replicas_dns is not None:
        return ReplicasDns(backend.replicas_dns)
    return None


class ReplicasFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"backend.replicas_file={path!r}"
        self._stamp: object = _UNREAD  # the file's (mtime, size) when last read
        self._read: list[ReplicaSettings] | str = []  # the replicas, or why they cannot be read

    async def replicas(self) -> list[ReplicaSettings]:
        stamp = await asyncio.to_thread(_stamp, self.path)  # file I/O off the event loop
        if stamp is None or stamp != self._stamp:
            self._stamp = stamp
            try:
                self._read = await asyncio.to_thread(read_replicas_file, self.path)
            except ConfigError as exc:
                self._read = str(exc)
            except ValueError as exc:  # (UnicodeDecodeError among them: not text)
                self._read = f"{self.where}: cannot be read ({exc})"
        if isinstance(self._read, str):
            raise SourceFailed(self._read)
        return list(self._read)


class ReplicasDns:
    def __init__(
        self, settings: ReplicasDnsSettings, resolve: Resolve | None = None, reverse: Reverse | None = None
    ) -> None:
        self.settings = settings
        self.where = f"backend.replicas_dns.name={settings.name!r}"
        self._resolve = resolve or system_resolver(settings.family)
        self._reverse = reverse or system_reverse
        self._pods: dict[str, str] = {}  # address -> its pod (addresses that resolve now)
        self._unknown: set[str] = set()  # addresses whose pod cannot be told (said once each)

    async def replicas(self) -> list[ReplicaSettings]:
        dns = self.settings
        try:
            found = await self._resolve(dns.name, dns.port)
        except OSError as exc:
            raise SourceFailed(f"{self.where} does not resolve: {exc.strerror or exc}") from None
        try:
            addresses = sorted({ipaddress.ip_address(a) for a in found})
        except (ValueError, TypeError) as exc:
            raise SourceFailed(f"{self.where} resolved to something that is not an address: {exc}") from None
        if not addresses:
            raise SourceFailed(f"{self.where} resolves to no {dns.family} address (no ready pod?)")
        named = [str(a) for a in addresses]
        if dns.dcgm_pod_label is not None:
            await self._learn_pods(named)
        return replicas_at(dns, named, self._pods)

    async def _learn_pods(self, addresses: list[str]) -> None:
        """The pod of each address not seen before (an address gone forgets its pod: a new pod may get it)."""
        self._pods = {a: pod for a, pod in self._pods.items() if a in addresses}
        self._unknown &= set(addresses)
        for address in addresses:
            if address in self._pods:
                continue
            try:
                name = await self._reverse(address)
            except OSError as exc:
                why = f"its reverse lookup failed ({exc.strerror or exc})"
            else:
                pod = pod_of(name, address)
                if pod is not None:
                    self._pods[address] = pod
                    self._unknown.discard(address)
                    continue
                why = f"its reverse name {name!r} names no pod (a StatefulSet's pods have one)"
            if address not in self._unknown:
                self._unknown.add(address)
                log.warning(
                    "%s: the replica at %s waits: its pod, which selects its GPU on dcgm-exporter "
                    "(backend.replicas_dns.dcgm_pod_label), is not known: %s",
                    self.where,
                    address,
                    why,
                )


def replicas_at(
    dns: ReplicasDnsSettings, addresses: Iterable[str], pods: Mapping[str, str]
) -> list[ReplicaSettings]:
    """One replica per address, in the order given: at ``scheme://address:port``, named ``address:port``;
    with ``dcgm_pod_label``, its pod's GPU selected, and an address whose pod is not known left out."""
    replicas = []
    for address in addresses:
        labels: dict[str, str] = {}
        if dns.dcgm_pod_label is not None:
            if address not in pods:
                continue
            labels = {dns.dcgm_pod_label: pods[address]}
        host = f"[{address}]" if ":" in address else address
        where = f"{host}:{dns.port}"
        replicas.append(ReplicaSettings(url=f"{dns.scheme}://{where}", name=where, dcgm_labels=labels))
    return replicas


def pod_of(name: str, address: str) -> str | None:
    """The pod a reverse name names: its first label (``vllm-0.vllm-headless.llm.svc.cluster.local``:
    ``vllm-0``). None for a name that only spells the address (``10-1-2-3.…``: an endpoint without a
    hostname, e.g. a Deployment's pod) or is the address itself."""
    first = name.rstrip(".").split(".")[0]
    dashed = address.replace(".", "-").replace(":", "-")
    if not first or name == address or first == dashed:
        return None
    return first


def system_resolver(family: str) -> Resolve:
    """The system's resolver through the event loop (a worker thread): A (ipv4) or AAAA (ipv6) records."""
    family_id = socket.AF_INET6 if family == "ipv6" else socket.AF_INET

    async def resolve(host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, family=family_id, type=socket.SOCK_STREAM
        )
        return [str(info[4][0]) for info in infos]

    return resolve


async def system_reverse(address: str) -> str:
    """The name an address resolves to in reverse (PTR), through the event loop."""
    name, _ = await asyncio.get_running_loop().getnameinfo((address, 0), socket.NI_NAMEREQD)
    return name


_UNREAD = object()


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size

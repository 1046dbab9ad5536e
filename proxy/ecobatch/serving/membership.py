"""Replicas that come and go: a source's list (``replica_sources``: a file, or a DNS name's addresses)
applied to the pool while the proxy runs.

Every ``backend.replicas_refresh_s`` the source says which replicas are wanted; ``plan_changes`` (pure)
compares that with the pool, by URL, and ``ReplicaMembership`` carries it out:

* a replica wanted and not in the pool **joins**: its engine starts (within ``backend.startup_timeout_s``),
  it must serve the pool's model, its meter starts and must not measure a GPU another replica measures;
  then the gate routes to it from its next round. A replica whose energy counter can first be read
  after it joined is held to the same rule then: one sharing a GPU leaves;
* a replica in the pool and no longer wanted **leaves**: it takes no new request, and once nothing of
  ecobatch's runs on it its meter closes (its last interval settles its requests) and its engine
  closes; its series go. The last replica taking requests never leaves (the source is probably wrong);
* a leaving replica wanted again stays (unless a rule put it out);
* a name still held by a leaving replica waits for it to go.

A source that cannot tell (a file that cannot be read, a name that does not resolve) is logged once per
cause and the pool kept as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..config import ReplicaSettings, url_key
from ..energy.meter import Meter
from ..engines.vllm_http import VllmHttpBackend
from ..errors import ConfigError
from .gate import ContinuousGate
from .pool import Replica, ReplicaPool
from .replica_sources import ReplicaSource, SourceFailed

__all__ = ["Changes", "Member", "ReplicaFactory", "ReplicaMembership", "plan_changes"]

log = logging.getLogger(__name__)

ReplicaFactory = Callable[[ReplicaSettings], Replica]
#: raises ConfigError when two of the (name, meter) given measure a GPU in common
GpuCheck = Callable[[list[tuple[str, Meter]]], None]


@dataclass(frozen=True, slots=True)
class Member:
    """What the membership rules know of a replica in the pool."""

    name: str
    url: str  # as ``url_key`` writes it
    up: bool
    leaving: bool
    #: leaving because a rule put it out (it measures another's GPU): wanted again, it still leaves
    evicted: bool = False


@dataclass(frozen=True, slots=True)
class Changes:
    """What one pass does: replicas that start joining, leaving ones that stay, ones that begin to leave,
    and unwanted ones kept because no other would take requests."""

    joins: tuple[ReplicaSettings, ...] = ()
    stays: tuple[str, ...] = ()
    leaves: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


def plan_changes(
    wanted: Sequence[ReplicaSettings], members: Sequence[Member], joining: Mapping[str, str]
) -> Changes:
    """The changes that make the pool (``members``, and ``joining``: URL key -> name of replicas starting)
    what the source wants. A name held by another replica (in the pool or joining) waits; an unwanted
    replica leaves only while another takes requests, or one is joining to take them."""
    present = {m.url: m for m in members}
    held = {m.name for m in members} | set(joining.values())
    joins: list[ReplicaSettings] = []
    stays: list[str] = []
    for listed in wanted:
        key, name = url_key(listed.url), listed.name or listed.url
        member = present.get(key)
        if member is not None:
            if member.leaving and not member.evicted:
                stays.append(member.name)
        elif key not in joining and name not in held:
            joins.append(listed)
            held.add(name)
    wanted_keys = {url_key(w.url) for w in wanted}
    taking = {m.name for m in members if m.up and (not m.leaving or m.name in stays)}
    someone_joins = bool(joining) or bool(joins)
    leaves: list[str] = []
    kept: list[str] = []
    for member in members:
        if member.url in wanted_keys or member.leaving:
            continue
        if not taking - {member.name}:
            if not someone_joins:
                kept.append(member.name)
            continue  # (it leaves once one that joins takes requests)
        leaves.append(member.name)
        taking.discard(member.name)
    return Changes(tuple(joins), tuple(stays), tuple(leaves), tuple(kept))


class ReplicaMembership:
    def __init__(
        self,
        source: ReplicaSource,
        refresh_s: float,
        startup_timeout_s: float,
        pool: ReplicaPool,
        gate: ContinuousGate,
        make: ReplicaFactory,
        meters: list[Meter],
        *,
        on_meter_gone: Callable[[Meter], None],
        check_gpus: GpuCheck,
    ) -> None:
        self.source, self.refresh_s, self.startup_timeout_s = source, refresh_s, startup_timeout_s
        self.pool, self.gate, self._make, self._meters = pool, gate, make, meters
        self._on_meter_gone, self._check_gpus = on_meter_gone, check_gpus
        self._joining: dict[str, asyncio.Task[None]] = {}  # by URL key
        self._joining_names: dict[str, str] = {}  # URL key -> name
        self._evicted: set[str] = set()  # URL keys of replicas a rule put out, until they have left
        self._retiring: set[asyncio.Task[None]] = set()
        self._failure: str | None = None  # the source's last failure (said once)
        gate.on_drained = self._drained

    async def run(self) -> None:
        """Reconcile every ``refresh_s`` until cancelled; then stop joins and let retires finish."""
        try:
            while True:
                await self.reconcile()
                await asyncio.sleep(self.refresh_s)
        finally:
            self.gate.on_drained = None
            for task in self._joining.values():
                task.cancel()
            pending = [*self._joining.values(), *self._retiring]
            if pending:  # a retire closes a meter and an engine: let it, briefly; then none is left behind
                _, late = await asyncio.wait(pending, timeout=_STOP_WAIT_S)
                for task in late:
                    task.cancel()
                if late:  # their cancellation runs their cleanup: wait for it (bounded) before the loop ends
                    await asyncio.wait(late, timeout=_STOP_WAIT_S)

    async def reconcile(self) -> None:
        """One pass: ask the source, start joins, begin leaves. Whatever goes wrong is logged and the
        replicas stay as they are."""
        try:
            wanted = await self.source.replicas()
        except SourceFailed as exc:
            if str(exc) != self._failure:
                log.error("%s; the replicas stay as they are", exc)
                self._failure = str(exc)
            return
        except Exception:
            log.exception("%s: asking for the replicas failed; they stay as they are", self.source.where)
            return
        if self._failure is not None:
            log.info("%s answers again", self.source.where)
            self._failure = None
        try:
            self._apply(plan_changes(wanted, self._members(), self._joining_names))
        except Exception:
            log.exception("%s: reconciling the replicas failed; they stay as they are", self.source.where)

    def _members(self) -> list[Member]:
        return [
            Member(r.name, url_key(r.url), r.up, r.leaving, url_key(r.url) in self._evicted)
            for r in self.pool.replicas
            if r.url is not None
        ]

    def _apply(self, changes: Changes) -> None:
        by_name = {r.name: r for r in self.pool.replicas}
        for name in changes.stays:
            self.gate.stay(by_name[name])
            log.info("replica %s is wanted again: it stays", name)
        for listed in changes.joins:
            key, name = url_key(listed.url), listed.name or listed.url
            task = asyncio.create_task(self._join(listed), name=f"ecobatch-join-{name}")
            self._joining[key], self._joining_names[key] = task, name
            task.add_done_callback(self._joined(key, name))
        for name in changes.kept:
            log.error("%s wants no replica that takes requests but %s: it stays", self.source.where, name)
        for name in changes.leaves:
            log.info("replica %s is no longer wanted: it takes no new request and leaves once idle", name)
            self._leave(by_name[name])

    def _leave(self, replica: Replica) -> None:
        if self.gate.begin_leaving(replica):
            self._drained(replica)

    def _joined(self, key: str, name: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._joining.pop(key, None)
            self._joining_names.pop(key, None)
            if not task.cancelled() and task.exception() is not None:
                log.error("replica %s could not join: %r", name, task.exception())

        return done

    async def _join(self, listed: ReplicaSettings) -> None:
        replica = self._make(listed)
        meter_started = False
        try:
            # a replica serves the pool's model: the one the replicas up serve (backend.model, or asked)
            served = [
                r.engine.upstream_model
                for r in self.pool.replicas
                if isinstance(r.engine, VllmHttpBackend) and r.engine.upstream_model
            ]
            if served and isinstance(replica.engine, VllmHttpBackend):
                replica.engine.require_model(served[0])
            async with asyncio.timeout(self.startup_timeout_s):
                await replica.engine.start(lambda message: log.info("replica %s: %s", replica.name, message))
            replica.meter.on_named = lambda: self._named_late(replica)
            meter_started = True
            await replica.meter.start(measure_idle=True)
            self._refuse_shared_gpu(replica)
            self.gate.join(replica)  # refuses a name in the pool already
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await _close(replica, meter_started=meter_started, served=False)
            self._on_meter_gone(replica.meter)  # its energy account exported what it read: its gauges go
            if not isinstance(exc, Exception):
                raise  # cancelled (shutdown): closed, and gone
            why = "it did not answer in time" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            log.error("replica %s (%s) cannot join: %s", replica.name, listed.url, why)
            return
        self._meters.append(replica.meter)
        log.info("replica %s (%s) joined", replica.name, listed.url)

    def _refuse_shared_gpu(self, replica: Replica) -> None:
        """ConfigError when ``replica`` measures a GPU another replica measures (counters read so far)."""
        for other in self.pool.replicas:
            if other is not replica:
                self._check_gpus([(other.name, other.meter), (replica.name, replica.meter)])

    def _named_late(self, replica: Replica) -> None:
        """A joined replica's counter was read for the first time: its GPUs are known now, and held to
        the join's rule. One that shares a GPU leaves (unless no other takes requests: then it stays,
        its joules counted twice, and says so)."""
        if replica not in self.pool.replicas or replica.leaving:
            return
        try:
            self._refuse_shared_gpu(replica)
        except ConfigError as exc:
            if not any(r.taking for r in self.pool.replicas if r is not replica):
                log.error(
                    "%s; %s takes the requests alone: it stays, and the GPU's energy is counted twice",
                    exc,
                    replica.name,
                )
                return
            log.error(
                "%s; %s leaves (its energy counter could first be read after it joined)", exc, replica.name
            )
            if replica.url is not None:
                self._evicted.add(url_key(replica.url))
            self._leave(replica)

    def _drained(self, replica: Replica) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(replica))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, replica: Replica) -> None:
        if not replica.leaving or replica.occupancy.sequences or replica not in self.pool.replicas:
            return  # wanted again, busy again, or gone already
        self.gate.forget(replica)
        if replica.url is not None:
            self._evicted.discard(url_key(replica.url))
        try:
            await _close(replica, meter_started=True)  # its meter's last interval settles its requests
        finally:
            if replica.meter in self._meters:
                self._meters.remove(replica.meter)
            self._on_meter_gone(replica.meter)
        log.info("replica %s left", replica.name)


async def _close(replica: Replica, *, meter_started: bool, served: bool = True) -> None:
    """Close a replica's meter (its last reading only where it served: a replica refused while joining
    exports no energy) and its engine."""
    try:
        if meter_started:
            await replica.meter.close(last_reading=served)
    finally:
        await replica.engine.close()


#: how long a stopping membership waits for its retires (each closes a meter and an engine): inside the
#: 2 s a stopping server gives the engine and the meters to close (``server._CLEANUP_S``)
_STOP_WAIT_S = 1.0

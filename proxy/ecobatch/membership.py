"""Replicas that come and go: ``backend.replicas_file``, reconciled while the proxy runs.

Every ``backend.replicas_refresh_s`` the file is read again if it changed (a Kubernetes ConfigMap
mounted as a file changes when the kubelet syncs it). What it lists is compared with the pool, by URL:

* a replica listed and not in the pool **joins**: its engine starts (within
  ``backend.startup_timeout_s``), it must serve the pool's model, its meter starts and must not
  measure a GPU another replica measures; then the gate routes to it from its next round;
* a replica in the pool and no longer listed **leaves**: it takes no new request, and once nothing of
  ecobatch's runs on it its meter closes (its last interval settles its requests) and its engine
  closes; its series go. The last replica taking requests never leaves (the file is probably wrong);
* a leaving replica listed again stays.

A file that cannot be read or parsed is logged and the pool kept as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from .backends.vllm_http import VllmHttpBackend
from .config import ReplicaSettings, read_replicas_file, url_key
from .energy.meter import Meter
from .errors import ConfigError
from .gate import ContinuousGate
from .pool import Replica, ReplicaPool

__all__ = ["ReplicaFactory", "ReplicaMembership"]

log = logging.getLogger(__name__)

ReplicaFactory = Callable[[ReplicaSettings], Replica]


class ReplicaMembership:
    def __init__(
        self,
        path: str,
        refresh_s: float,
        startup_timeout_s: float,
        pool: ReplicaPool,
        gate: ContinuousGate,
        make: ReplicaFactory,
        meters: list[Meter],
        *,
        on_meter: Callable[[Meter], None],
        check_gpus: Callable[[list[tuple[str, Meter]]], None],
    ) -> None:
        self.path, self.refresh_s, self.startup_timeout_s = path, refresh_s, startup_timeout_s
        self.pool, self.gate, self._make, self._meters = pool, gate, make, meters
        self._on_meter, self._check_gpus = on_meter, check_gpus
        self._stamp = _stamp(path)
        self._wanted: list[ReplicaSettings] | None = None  # None: as the pool started
        self._joining: dict[str, asyncio.Task[None]] = {}  # by URL key
        self._tasks: set[asyncio.Task[None]] = set()
        gate.on_drained = self._drained

    async def run(self) -> None:
        """Reconcile every ``refresh_s`` until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.refresh_s)
                self.reconcile()
        finally:
            for task in [*self._joining.values(), *self._tasks]:
                task.cancel()
            for task in [*self._joining.values(), *self._tasks]:
                with contextlib.suppress(BaseException):
                    await task

    def reconcile(self) -> None:
        """One pass: read the file if it changed, start joins, begin leaves."""
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            try:
                self._wanted = read_replicas_file(self.path)
                self._stamp = stamp
            except ConfigError as exc:
                log.error("%s; the replicas stay as they are", exc)
                return
        if self._wanted is None:
            return
        wanted = {url_key(w.url): w for w in self._wanted}
        present = {url_key(r.url): r for r in self.pool.replicas if r.url is not None}
        for key, listed in wanted.items():
            replica = present.get(key)
            if replica is not None and replica.leaving:
                replica.leaving = False
                log.info("replica %s is listed again: it stays", replica.name)
            elif replica is None and key not in self._joining:
                task = asyncio.create_task(self._join(listed), name=f"ecobatch-join-{listed.name}")
                self._joining[key] = task
                task.add_done_callback(self._joined(key))
        for key, replica in present.items():
            if key in wanted or replica.leaving:
                continue
            others = [r for r in self.pool.replicas if r is not replica and r.taking]
            if not others and self._joining:
                continue  # it leaves once one that joins takes requests
            if not others:
                log.error("%s lists no replica that takes requests but %s: it stays", self.path, replica.name)
                continue
            log.info(
                "replica %s is no longer listed: it takes no new request and leaves once idle", replica.name
            )
            if self.gate.begin_leaving(replica):
                self._drained(replica)

    def _joined(self, key: str) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._joining.pop(key, None)

        return done

    async def _join(self, listed: ReplicaSettings) -> None:
        replica = self._make(listed)
        if any(r.name == replica.name for r in self.pool.replicas):
            log.error("%s: a replica named %s is in the pool already; not added", self.path, replica.name)
            return
        started = False
        try:
            async with asyncio.timeout(self.startup_timeout_s):
                await replica.engine.start(lambda message: log.info("replica %s: %s", replica.name, message))
            if isinstance(replica.engine, VllmHttpBackend):
                replica.engine.require_model(self.pool.model)
            await replica.meter.start(measure_idle=True)
            started = True
            self._check_gpus([(r.name, r.meter) for r in [*self.pool.replicas, replica]])
        except (ConfigError, TimeoutError, OSError, ValueError) as exc:
            why = "it did not answer in time" if isinstance(exc, TimeoutError) else str(exc)
            log.error("replica %s (%s) cannot join: %s", replica.name, listed.url, why)
            await _close(replica, meter_started=started)
            return
        self._on_meter(replica.meter)
        self._meters.append(replica.meter)
        self.gate.join(replica)
        log.info("replica %s (%s) joined", replica.name, listed.url)

    def _drained(self, replica: Replica) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(replica))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, replica: Replica) -> None:
        if not replica.leaving or replica.occupancy.sequences:  # listed again, or busy again
            return
        self.gate.forget(replica)
        if replica.meter in self._meters:
            self._meters.remove(replica.meter)
        await _close(replica, meter_started=True)
        log.info("replica %s left", replica.name)


async def _close(replica: Replica, *, meter_started: bool) -> None:
    if meter_started:
        await replica.meter.close()  # its last interval settles its requests
    await replica.engine.close()


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size

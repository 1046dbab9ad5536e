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
        on_meter_gone: Callable[[Meter], None],
        check_gpus: Callable[[list[tuple[str, Meter]]], None],
    ) -> None:
        self.path, self.refresh_s, self.startup_timeout_s = path, refresh_s, startup_timeout_s
        self.pool, self.gate, self._make, self._meters = pool, gate, make, meters
        self._on_meter, self._on_meter_gone, self._check_gpus = on_meter, on_meter_gone, check_gpus
        self._stamp: tuple[int, int] | None = None  # the first pass compares the file with the pool
        self._wanted: list[ReplicaSettings] | None = None
        self._joining: dict[str, asyncio.Task[None]] = {}  # by URL key
        self._joining_names: set[str] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        gate.on_drained = self._drained

    async def run(self) -> None:
        """Reconcile every ``refresh_s`` until cancelled; then stop joins and let retires finish."""
        try:
            while True:
                self.reconcile()
                await asyncio.sleep(self.refresh_s)
        finally:
            self.gate.on_drained = None
            for task in self._joining.values():
                task.cancel()
            pending = [*self._joining.values(), *self._retiring]
            if pending:  # a retire closes a meter and an engine: let it (bounded by their own close)
                await asyncio.wait(pending, timeout=_STOP_WAIT_S)

    def reconcile(self) -> None:
        """One pass: read the file if it changed, start joins, begin leaves. Whatever goes wrong is
        logged and the replicas stay as they are."""
        try:
            self._reconcile()
        except Exception:
            log.exception("%s: reconciling the replicas failed; they stay as they are", self.path)

    def _reconcile(self) -> None:
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            try:
                self._wanted = read_replicas_file(self.path)
            except (ConfigError, ValueError, UnicodeError) as exc:
                log.error("%s; the replicas stay as they are", exc)
                self._stamp = stamp  # said once per change of the file
                return
            self._stamp = stamp
        if self._wanted is None:
            return
        wanted = {url_key(w.url): w for w in self._wanted}
        present = {url_key(r.url): r for r in self.pool.replicas if r.url is not None}
        names = {r.name for r in self.pool.replicas}
        for key, listed in wanted.items():
            replica = present.get(key)
            if replica is not None and replica.leaving:
                self.gate.stay(replica)
                log.info("replica %s is listed again: it stays", replica.name)
            elif replica is None and key not in self._joining and listed.name not in names:
                # (a listed name still taken by one that leaves: it joins once that one has gone)
                task = asyncio.create_task(self._join(listed), name=f"ecobatch-join-{listed.name}")
                self._joining[key] = task
                self._joining_names.add(str(listed.name))
                task.add_done_callback(self._joined(key, str(listed.name)))
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

    def _joined(self, key: str, name: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._joining.pop(key, None)
            self._joining_names.discard(name)
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
            meter_started = True
            await replica.meter.start(measure_idle=True)
            self._check_gpus([(r.name, r.meter) for r in [*self.pool.replicas, replica]])
            self.gate.join(replica)  # refuses a name in the pool already
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await _close(replica, meter_started=meter_started)
            if not isinstance(exc, Exception):
                raise  # cancelled (shutdown): closed, and gone
            why = "it did not answer in time" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            log.error("replica %s (%s) cannot join: %s", replica.name, listed.url, why)
            return
        self._on_meter(replica.meter)
        self._meters.append(replica.meter)
        log.info("replica %s (%s) joined", replica.name, listed.url)

    def _drained(self, replica: Replica) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(replica))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, replica: Replica) -> None:
        if not replica.leaving or replica.occupancy.sequences or replica not in self.pool.replicas:
            return  # listed again, busy again, or gone already
        self.gate.forget(replica)
        try:
            await _close(replica, meter_started=True)  # its meter's last interval settles its requests
        finally:
            if replica.meter in self._meters:
                self._meters.remove(replica.meter)
            self._on_meter_gone(replica.meter)
        log.info("replica %s left", replica.name)


async def _close(replica: Replica, *, meter_started: bool) -> None:
    try:
        if meter_started:
            await replica.meter.close()
    finally:
        await replica.engine.close()


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


#: how long a stopping membership waits for its retires (each closes a meter and an engine)
_STOP_WAIT_S = 5.0

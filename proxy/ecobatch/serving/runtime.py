"""The proxy's moving parts and their life: starting, ready, draining, stopped (or failed).

``Runtime`` owns the engine, the energy accounts (one per replica: its meter and ledger, the one writer
of its requests' estimates and receipts, wired when it was built: ``energy.account``), the dispatcher,
the metrics and the receipts store. The HTTP server binds first and ``bring_up`` starts the rest (an
engine may take minutes: a remote vLLM still loading, a model being read); until it is ready, requests
and ``/health`` answer 503 with the reason ("waiting for upstream http://…: connection refused"), and
the reason is logged every few seconds.
``drain`` is the first half of a graceful shutdown: new requests get 503 with ``Retry-After`` while
the dispatcher finishes what is in flight, for up to the grace; ``close`` releases the meter and the
engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal

from ..clock import Clock
from ..config import Settings
from ..energy.account import EnergyAccount
from ..energy.meter import Meter
from ..energy.receipts import Receipts
from ..engines.base import StaticEngine
from ..errors import ConfigError, NotReady
from ..profile import EnergyProfile
from .batcher import StaticBatcher
from .dispatcher import Dispatcher
from .gate import ContinuousGate
from .membership import ReplicaFactory, ReplicaMembership
from .metrics import Metrics
from .pool import Replica, ReplicaPool
from .replica_sources import ReplicaSource, SourceFailed

__all__ = ["Backend", "Runtime", "State"]

log = logging.getLogger(__name__)
State = Literal["starting", "ready", "draining", "stopped", "failed"]
#: what the app runs requests on (``backend.*``): a static engine, or the replicas of a continuous one
Backend = StaticEngine | ReplicaPool
_PROGRESS_EVERY_S = 5.0


class Runtime:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        receipts: Receipts,
        profile: EnergyProfile,
        engine: Backend,
        accounts: list[EnergyAccount],
        clock: Clock,
        replica_factory: ReplicaFactory | None = None,
        replica_source: ReplicaSource | None = None,
    ) -> None:
        """``accounts``: the energy accounts of the engine's GPUs (a static engine's one, or the replicas'),
        writing to ``receipts`` and ``metrics``."""
        self.settings, self.profile, self.engine = settings, profile, engine
        self.clock = clock
        self.receipts, self.metrics, self.registry = receipts, metrics, metrics.registry
        metrics.set_model(engine.model)
        metrics.describe_profile(profile)
        self._accounts = accounts
        #: one meter per replica (the static engine's: one); the first is the one /health names
        self.meters = [account.meter for account in accounts]
        self.meter: Meter | None = self.meters[0] if self.meters else None
        self.dispatcher: Dispatcher | None = None
        #: replicas that come and go (backend.replicas_file, backend.replicas_dns): where they are listed,
        #: and what builds one (None: the replicas are fixed)
        self.replica_source, self.replica_factory = replica_source, replica_factory
        self._membership: asyncio.Task[None] | None = None
        self.state: State = "starting"
        self.reason = "starting"
        self._last_progress_log_s = float("-inf")

    # ---- what the routes use -------------------------------------------------------------------
    def ready_dispatcher(self) -> Dispatcher:
        """The dispatcher, or ``NotReady`` (503 + Retry-After) saying why not."""
        if self.state == "ready" and self.dispatcher is not None:
            return self.dispatcher
        if self.state == "draining":
            raise NotReady("ecobatch is shutting down; retry on another replica", retry_after_s=5.0)
        raise NotReady(f"ecobatch is not ready: {self.reason}", retry_after_s=5.0)

    def progress(self, message: str) -> None:
        """An engine's start-up progress: shown by /health, logged every few seconds."""
        self.reason = message
        now = time.monotonic()
        if now - self._last_progress_log_s >= _PROGRESS_EVERY_S:
            self._last_progress_log_s = now
            log.info("starting: %s", message)

    # ---- life ----------------------------------------------------------------------------------
    async def bring_up(self) -> None:
        """Start the engine (within ``backend.startup_timeout_s``), the meter and the dispatcher."""
        timeout_s = self.settings.backend.startup_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                if isinstance(self.engine, ReplicaPool) and not self.engine.replicas:
                    await self._first_replicas(self.engine)
                await self.engine.start(self.progress)
        except TimeoutError:
            self._fail(
                f"the engine was not ready within backend.startup_timeout_s={timeout_s:g}: {self.reason}"
            )
            raise
        except BaseException as exc:
            self._fail(str(exc) or repr(exc))
            raise
        try:
            dispatcher = await self._dispatcher()
        except BaseException as exc:  # a meter that cannot be built (energy.meter=nvml without a GPU), …
            self._fail(str(exc) or repr(exc))
            raise
        await dispatcher.start()
        self.dispatcher = dispatcher
        self.state, self.reason = "ready", "ready"
        backend = self.settings.backend
        source, factory = self.replica_source, self.replica_factory
        if source is not None and factory is not None and isinstance(dispatcher, ContinuousGate):
            assert isinstance(self.engine, ReplicaPool)
            membership = ReplicaMembership(
                source,
                backend.replicas_refresh_s,
                backend.startup_timeout_s,
                self.engine,
                dispatcher,
                factory,
                self.meters,
                on_meter_gone=self.metrics.forget_gpu,
                check_gpus=_refuse_shared_gpus,
            )
            self._membership = asyncio.create_task(membership.run(), name="ecobatch-membership")
        log.info(
            "ecobatch ready: backend=%s (%s engine) model=%s profile=%s (%s, %s) energy=%s",
            self.engine.name,
            self.engine.shape,
            self.engine.model,
            self.profile.name,
            self.profile.kind,
            self.profile.source,
            ", ".join(sorted({m.source for m in self.meters})),
        )

    async def _first_replicas(self, pool: ReplicaPool) -> None:
        """A pool whose replicas come from a source that is asked at run time (DNS): ask it until it names
        some (the runtime bounds how long), then build them as the replicas a file lists at start-up."""
        source, factory = self.replica_source, self.replica_factory
        if source is None or factory is None:
            raise ConfigError("no replica to start, and no source to ask for them")
        while True:
            try:
                wanted = await source.replicas()
            except SourceFailed as exc:
                self.progress(f"waiting for replicas: {exc}")
            else:
                if wanted:
                    break
                self.progress(f"waiting for replicas: {source.where} names none")
            await asyncio.sleep(self.settings.backend.replicas_refresh_s)
        for listed in wanted:
            replica = factory(listed)
            pool.add(replica)
            self.meters.append(replica.meter)
        self.meter = self.meters[0]
        log.info("replicas from %s: %s", source.where, ", ".join(r.name for r in pool.replicas))

    async def _dispatcher(self) -> Dispatcher:
        """Start the meters, then the dispatcher for the engine that is up."""
        self.metrics.set_model(self.engine.model)
        settings = self.settings
        engine = self.engine
        if isinstance(engine, ReplicaPool):
            for replica in engine.replicas:
                replica.meter.on_named = _check_late(engine, replica)
            # a replica still loading its model draws more than idle: its idle power is not probed
            await asyncio.gather(
                *(r.meter.start(measure_idle=r.health.state != "starting") for r in engine.replicas)
            )
            _refuse_shared_gpus([(r.name, r.meter) for r in engine.replicas])
            return ContinuousGate(
                engine,
                self.metrics,
                self.profile,
                settings.batching,
                request_timeout_s=settings.backend.request_timeout_s,
                clock=self.clock,
                routing=settings.backend.routing,
                max_prompts_per_request=settings.server.max_prompts_per_request,
                engine_priority=settings.backend.engine_priority,
            )
        (account,) = self._accounts
        await account.meter.start()
        return StaticBatcher(
            engine,
            account,
            self.metrics,
            self.profile,
            settings.batching,
            request_timeout_s=settings.backend.request_timeout_s,
            clock=self.clock,
            max_prompts_per_request=settings.server.max_prompts_per_request,
        )

    def _fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests (503 + Retry-After) and let the dispatcher finish for up to ``grace_s``."""
        if self.state in ("draining", "stopped"):
            return
        previous, self.state = self.state, "draining"
        self.reason = f"shutting down: finishing in-flight work for up to {grace_s:g} s"
        if previous == "ready" and self.dispatcher is not None:
            log.info(
                "draining: %d in flight, %d queued; grace %.0f s",
                self.dispatcher.inflight,
                self.dispatcher.queue_depth,
                grace_s,
            )
            started = time.monotonic()
            await self.dispatcher.close(grace_s)
            log.info("drained in %.1f s", time.monotonic() - started)

    async def watch_loop_lag(self, every_s: float = 0.1) -> None:
        """Observe how late the event loop wakes up: a stalled loop delays every request."""
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + every_s
            await asyncio.sleep(every_s)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - planned))

    async def close(self) -> None:
        """Release the meter (its last interval settles every request) and the engine."""
        self.state = "stopped"
        if self._membership is not None:
            self._membership.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._membership
        try:
            for meter in list(self.meters):
                await meter.close()
        finally:
            await self.engine.close()


def _check_late(pool: ReplicaPool, replica: Replica) -> Callable[[], None]:
    """For a replica there at start-up whose counter could first be read later: its GPUs against the
    other replicas' now (a replica that joined later is the membership's to check)."""

    def check() -> None:
        for other in pool.replicas:
            if other is replica:
                continue
            try:
                _refuse_shared_gpus([(other.name, other.meter), (replica.name, replica.meter)])
            except ConfigError as exc:
                log.error("%s; its energy is counted twice until this is fixed and ecobatch restarted", exc)

    return check


def _refuse_shared_gpus(meters: list[tuple[str, Meter]]) -> None:
    """Two replicas' meters reading a GPU in common would each charge its energy to their own requests
    (counted twice): each replica must measure its own GPUs. Modelled meters are per replica already;
    a meter never read yet has not named its GPUs (one that cannot be read just now has)."""
    owner: dict[tuple[str, str], str] = {}
    for name, meter in meters:
        reader = meter.reader
        if reader is None or not meter.named:
            continue
        # the reader's own names for its GPUs ("0+1"; dcgm: "host/0+host/1"), per exporter for dcgm
        # (two exporters on two hosts may both call their GPU "0")
        where = str(getattr(reader, "url", reader.source))
        for gpu in reader.gpu.split("+"):
            if (where, gpu) in owner:
                raise ConfigError(
                    f"backend.replicas: {owner[where, gpu]} and {name} both measure GPU {gpu}; give each "
                    "replica its own gpu_indices (NVML) or dcgm_labels / dcgm_url (dcgm-exporter), in a "
                    "config file (backend.replicas[])",
                    field="backend.replicas",
                )
            owner[where, gpu] = name

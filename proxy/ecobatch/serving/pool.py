"""The replicas of a continuous engine, each one unit: its engine, its energy account and its load.

A ``Replica`` holds everything about one engine behind the gate: the engine (a vLLM OpenAI server, or
vLLM in-process), its typed health, its energy account (``energy.account``: its meter and ledger, the
joules of its own GPUs, and its requests' estimates and receipts), and what ecobatch runs on it
(``Occupancy``: sequences in flight, KV tokens promised to them, when they are predicted to end).
``build_pool`` makes every replica, energy account included, in one place; one engine is a pool of one.

``ReplicaPool`` is what the app sees as the engine: one model name, one ``prepare``, one health view.
Start-up: the pool is ready as soon as **one** replica answers; the others are waited for in the
background and take requests once they answer. Replicas must serve the same model: one that serves
another is a configuration error. A request is refused at once (503 ``upstream_down``) only when no
replica is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import msgspec
from prometheus_client import CollectorRegistry

from ..clock import Clock
from ..config import ReplicaSettings, Settings
from ..domain import GenerationRequest, Headroom
from ..energy.account import EnergyAccount
from ..energy.choose import MeterSpec
from ..energy.ledger import Ledger, LedgerReports
from ..energy.meter import Meter
from ..engines.base import ContinuousEngine, EngineHealth, EngineShape, HealthState, Progress
from ..engines.vllm_http import VllmHttpBackend
from ..errors import ConfigError, UpstreamDown
from ..profile import EnergyProfile

__all__ = [
    "AccountFactory",
    "MeterFactory",
    "Occupancy",
    "PoolHealth",
    "Replica",
    "ReplicaPool",
    "build_pool",
    "make_replica",
]

log = logging.getLogger(__name__)
#: the meter for a spec, and its ledger reporting where it is told (``energy.choose.build_meter``)
MeterFactory = Callable[[MeterSpec, EnergyProfile, Clock, LedgerReports], Meter]
#: the energy account for a spec (its meter from a ``MeterFactory``, its figures to the app's receipts
#: and metrics)
AccountFactory = Callable[[MeterSpec], EnergyAccount]
#: how many changes of our in-flight count a replica remembers (to read an engine's counts against)
_OURS_KEPT = 4096
#: how often a replica still starting after the pool is ready says what it waits for
_LATE_LOG_EVERY_S = 30.0


@dataclass(slots=True)
class _Running:
    sequences: int
    kv_tokens: float
    ends_s: float
    entry: int  # which heap entry is this request's (an earlier request's key may be reused)


class Occupancy:
    """ecobatch's requests running on one replica: their sequences, the KV tokens they will hold at their
    predicted end, and when they are predicted to end (a heap: the latest end in O(log n)).

    A request's key is only unique while it runs (``id()`` of its pending entry is reused once that is
    freed): a heap entry counts only while it is the running request's own, and the heap is rebuilt from
    the running requests when stale entries outnumber them (under steady load they never reach the top)."""

    def __init__(self) -> None:
        self.sequences = 0
        self.kv_tokens = 0.0
        self._running: dict[int, _Running] = {}
        self._ends: list[tuple[float, int, int]] = []  # (-ends_s, entry, key)
        self._entries = itertools.count()

    def add(self, key: int, sequences: int, kv_tokens: float, ends_s: float) -> None:
        self.remove(key)
        entry = next(self._entries)
        self._running[key] = _Running(sequences, kv_tokens, ends_s, entry)
        self.sequences += sequences
        self.kv_tokens += kv_tokens
        heapq.heappush(self._ends, (-ends_s, entry, key))
        if len(self._ends) > 2 * len(self._running) + 32:
            self._ends = [(-r.ends_s, r.entry, k) for k, r in self._running.items()]
            heapq.heapify(self._ends)

    def remove(self, key: int) -> None:
        running = self._running.pop(key, None)
        if running is not None:
            self.sequences -= running.sequences
            self.kv_tokens -= running.kv_tokens

    def ends_s(self, key: int) -> float | None:
        """When that request is predicted to end (None: it does not run here)."""
        running = self._running.get(key)
        return None if running is None else running.ends_s

    def busy_until_s(self) -> float | None:
        """When the last of them is predicted to end (None: none runs)."""
        ends = self._ends
        while ends and not self._live(ends[0][1], ends[0][2]):
            heapq.heappop(ends)
        return -ends[0][0] if ends else None

    def _live(self, entry: int, key: int) -> bool:
        running = self._running.get(key)
        return running is not None and running.entry == entry

    def __contains__(self, key: int) -> bool:
        return key in self._running

    def __len__(self) -> int:
        return len(self._running)


class Replica:
    """One engine behind the gate, its energy account and its load."""

    def __init__(
        self, name: str, engine: ContinuousEngine, account: EnergyAccount, url: str | None = None
    ) -> None:
        self.name, self.engine, self.account = name, engine, account
        #: where it is (vllm-http), to tell it in a replicas file
        self.url = url
        #: removed from the replicas file: it takes no new request and goes once its requests end
        self.leaving = False
        self.occupancy = Occupancy()
        self._polled: Headroom | None = None
        self._ours_at_poll = 0
        #: (time.monotonic(), our sequences from then on): to know ours when the engine was read
        self._ours_since: deque[tuple[float, int]] = deque([(float("-inf"), 0)], maxlen=_OURS_KEPT)
        #: another client's sequences as the energy account counts them (``others_running``)
        self._others_for_energy = 0
        account.meter.others_in_flight = self.others_for_energy  # its GPUs' other work, by the engine's count

    @property
    def meter(self) -> Meter:
        return self.account.meter

    @property
    def ledger(self) -> Ledger:
        return self.account.ledger

    @property
    def health(self) -> EngineHealth:
        return self.engine.health()

    @property
    def up(self) -> bool:
        return self.engine.health().up

    @property
    def inflight(self) -> int:
        return self.occupancy.sequences

    @property
    def taking(self) -> bool:
        """Up and not leaving: new requests may go to it."""
        return self.up and not self.leaving

    def start(self, key: int, sequences: int, kv_tokens: float, ends_s: float) -> None:
        """One of ecobatch's requests starts here."""
        self._observe()
        self.occupancy.add(key, sequences, kv_tokens, ends_s)
        self._ours_since.append((time.monotonic(), self.occupancy.sequences))

    def finish(self, key: int) -> None:
        """One of ecobatch's requests is done here (or moved away)."""
        self._observe()
        self.occupancy.remove(key)
        self._ours_since.append((time.monotonic(), self.occupancy.sequences))

    def other_running(self) -> int:
        """Requests other clients run on the engine: its running and waiting count beyond ecobatch's own
        as they stood when the engine's figures were read (0 where the engine does not say)."""
        headroom = self._observe()
        engine = (headroom.running or 0) + (headroom.waiting or 0)
        return max(0, engine - self._ours_at_poll)

    def _observe(self) -> Headroom:
        """Note what was ours when the engine's latest figures were read. A reading that says when it was
        asked for: the most of ours at any moment from then on (the engine counted at one of them; a
        request of ours that ended meanwhile is never taken for another client's). One that does not
        say: ours now, since ``start`` and ``finish`` look first, so it came after the last change."""
        headroom = self.engine.headroom()
        if headroom is not self._polled:
            ours = self.occupancy.sequences
            if headroom.read_at_s is not None:
                ours = self._most_ours_since(headroom.read_at_s)
            previous, previous_ours = self._polled, self._ours_at_poll
            self._polled, self._ours_at_poll = headroom, ours
            self._others_for_energy = others_running(previous, previous_ours, headroom, ours)
        return headroom

    def others_for_energy(self) -> int:
        """Another client's sequences on the engine, as the energy ledger charges them."""
        self._observe()
        return self._others_for_energy

    def _most_ours_since(self, since_s: float) -> int:
        most = 0
        for at_s, ours in reversed(self._ours_since):
            most = max(most, ours)
            if at_s < since_s:  # the value in effect at since_s: nothing earlier counts
                break
        return most


def others_running(previous: Headroom | None, previous_ours: int, latest: Headroom, latest_ours: int) -> int:
    """Another client's sequences on the engine, for the energy ledger, from its two latest readings:
    the engine's count beyond ours in **both** (vLLM updates its running gauge only when it steps, so
    the reading just after our last request ended can still count it), and none at all when its token
    counters did not move between them (an engine at rest runs nothing, whatever the gauge says) or it
    has none."""
    if previous is None or latest.engine_tokens is None or previous.engine_tokens is None:
        return 0  # no token counters (an in-process engine, which no other client shares): no evidence
    if latest.engine_tokens == previous.engine_tokens:
        return 0

    def beyond(headroom: Headroom, ours: int) -> int:  # running only: a waiting request draws nothing
        return max(0, (headroom.running or 0) - ours)

    return min(beyond(previous, previous_ours), beyond(latest, latest_ours))


@dataclass(frozen=True, slots=True)
class PoolHealth:
    """The pool's state: up while one replica is up; each replica's own health."""

    state: HealthState
    replicas: tuple[tuple[str, EngineHealth], ...]
    last_error: str | None

    @property
    def up(self) -> bool:
        return self.state == "up"


class ReplicaPool:
    shape: ClassVar[EngineShape] = "continuous"

    def __init__(
        self, replicas: Sequence[Replica], *, name: str | None = None, model: str = "unknown"
    ) -> None:
        """``replicas``; or none yet (``name``: the engines' kind), when a source names them at start-up
        (``backend.replicas_dns``): the runtime adds them before ``start``."""
        if not replicas and name is None:
            raise ValueError("a pool needs at least one replica, or the name of the engines to come")
        self.replicas = list(replicas)
        self.name = name or self.replicas[0].engine.name
        self._model = model  # the served name until a replica is there to say
        self._waiting: dict[str, str] = {}  # replica name -> what its start waits for
        self._starts: list[asyncio.Task[None]] = []
        self._ready = False
        self._last_late_log_s = float("-inf")

    @property
    def metrics_registry(self) -> CollectorRegistry | None:
        """An in-process engine's own registry (vllm-async's vLLM series, known once it has started),
        served beside ecobatch's."""
        return self.replicas[0].engine.metrics_registry if len(self.replicas) == 1 else None

    @property
    def model(self) -> str:
        """The served name: the first replica up's (they all serve the same model)."""
        started = [r.engine for r in self.replicas if r.up]
        engines = started or [r.engine for r in self.replicas]
        return engines[0].model if engines else self._model

    # ---- life ------------------------------------------------------------------------------------
    async def start(self, progress: Progress) -> None:
        """Start every replica; return once one of them is up (the rest come up in the background)."""
        if len(self.replicas) == 1:
            await self.replicas[0].engine.start(progress)
            self._ready = True
            return

        def reporter(name: str) -> Progress:
            def report(message: str) -> None:
                self._waiting[name] = message
                if not self._ready:
                    progress("; ".join(f"{n}: {m}" for n, m in sorted(self._waiting.items())))
                elif time.monotonic() - self._last_late_log_s >= _LATE_LOG_EVERY_S:
                    self._last_late_log_s = time.monotonic()
                    log.warning("replica %s is not up yet: %s", name, message)

            return report

        self._starts = [
            asyncio.create_task(r.engine.start(reporter(r.name)), name=f"ecobatch-start-{r.name}")
            for r in self.replicas
        ]
        for replica, task in zip(self.replicas, self._starts, strict=True):
            task.add_done_callback(self._started(replica))
        pending: set[asyncio.Task[None]] = set(self._starts)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a replica serving another model: a configuration error, stop here
                started = [r for r in self.replicas if r.health.state != "starting"]
                if started:
                    self._agree_on_model(started)
                    self._ready = True
                    return
        except BaseException:  # a configuration error, or start-up timed out: the others stop too
            for task in self._starts:
                task.cancel()
            await asyncio.gather(*self._starts, return_exceptions=True)
            raise

    def _agree_on_model(self, started: list[Replica]) -> None:
        """Every replica must serve the model the first one serves: those still starting are held to it;
        two that answered together with different models stop the start-up."""
        https = [r.engine for r in started if isinstance(r.engine, VllmHttpBackend)]
        if not https:
            return
        model = https[0].upstream_model
        others = sorted({str(e.upstream_model) for e in https} - {str(model)})
        if others:
            names = ", ".join(repr(m) for m in [model, *others])
            raise ConfigError(
                f"backend.replicas serve different models ({names}); set backend.model to the one to serve",
                field="backend.replicas",
            )
        for replica in self.replicas:
            if isinstance(replica.engine, VllmHttpBackend):
                replica.engine.require_model(model)

    def _started(self, replica: Replica) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._waiting.pop(replica.name, None)
            if not task.cancelled() and task.exception() is None:
                log.info("replica %s is up: %s", replica.name, replica.health.upstream or replica.engine.name)
            elif self._ready and not task.cancelled():
                log.error("replica %s cannot serve: %s", replica.name, task.exception())
                self._waiting[replica.name] = str(task.exception())

        return done

    async def close(self) -> None:
        for task in self._starts:
            task.cancel()
        for task in self._starts:
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(*(r.engine.close() for r in self.replicas))

    # ---- replicas that come and go (backend.replicas_file, backend.replicas_dns) ---------------------------
    def add(self, replica: Replica) -> None:
        """A replica that has started serving the pool's model joins (the gate reads the same list)."""
        if any(r.name == replica.name for r in self.replicas):
            raise ValueError(f"a replica named {replica.name!r} is in the pool already")
        self.replicas.append(replica)

    def remove(self, replica: Replica) -> None:
        """A replica that has left (nothing of ours runs on it) goes; the last one never does."""
        if len(self.replicas) > 1 and replica in self.replicas:
            self.replicas.remove(replica)

    # ---- what the app reads --------------------------------------------------------------------------
    def headroom(self) -> Headroom:
        """The replicas' headroom summed (each replica's own is what the gate uses)."""
        return _summed([r.engine.headroom() for r in self.replicas])

    def health(self) -> PoolHealth:
        states = []
        for replica in self.replicas:
            state = replica.health
            waiting = self._waiting.get(replica.name)
            if waiting is not None and not state.last_error:
                state = dataclasses.replace(state, last_error=waiting)
            states.append((replica.name, state))
        up = any(s.up for _, s in states)
        reasons = "; ".join(f"{n}: {s.last_error or s.state}" for n, s in states)
        if len(states) == 1:
            reasons = states[0][1].last_error or ""
        return PoolHealth("up" if up else "down", tuple(states), None if up else reasons or None)

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Checked against a replica that is up (they serve the same model with the same limits)."""
        for replica in self.replicas:
            if replica.up:
                return await replica.engine.prepare(request)
        if len(self.replicas) == 1:
            return await self.replicas[0].engine.prepare(request)  # its own error says why
        reasons = "; ".join(f"{r.name}: {r.health.last_error or r.health.state}" for r in self.replicas)
        raise UpstreamDown(f"no vLLM replica is up ({reasons}); retry later", retry_after_s=5.0)


def _summed(rooms: Sequence[Headroom]) -> Headroom:
    def total(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    return Headroom(
        kv_free_tokens=total([h.kv_free_tokens for h in rooms]),
        kv_capacity_tokens=total([h.kv_capacity_tokens for h in rooms]),
        running=total([h.running for h in rooms]),
        waiting=total([h.waiting for h in rooms]),
    )


def build_pool(
    settings: Settings,
    profile: EnergyProfile,
    open_account: AccountFactory,
    engine: ContinuousEngine | None = None,
) -> ReplicaPool:
    """Every replica with its engine and its energy account: ``backend.replicas`` (a ``vllm-http`` engine
    each, its own GPUs measured), else the one engine (``engine``, or the configured one). With
    ``backend.replicas_dns`` none yet: the runtime asks DNS for them at start-up."""
    backend = settings.backend
    if engine is None and backend.replicas_dns is not None:
        return ReplicaPool(
            [], name="vllm-http", model=backend.served_model_name or backend.model or "unknown"
        )
    if engine is not None or not backend.replicas:
        if engine is None:
            from ..engines import create_continuous_engine

            engine = create_continuous_engine(settings)
        return ReplicaPool([Replica("r0", engine, open_account(MeterSpec(settings)))])
    replicas = [
        make_replica(settings, msgspec.structs.replace(listed, name=name), profile, open_account)
        for listed, name in zip(backend.replicas, backend.replica_names, strict=True)
    ]
    return ReplicaPool(replicas)


def make_replica(
    settings: Settings,
    listed: ReplicaSettings,
    profile: EnergyProfile,
    open_account: AccountFactory,
) -> Replica:
    """One vllm-http replica with its energy account (its own GPUs, series named ``NAME:…``)."""
    name = listed.name or listed.url
    own = settings.as_replica(listed)
    spec = MeterSpec(own, gpu_prefix=f"{name}:", idle_fallback_w=profile.idle_power_w)
    return Replica(name, VllmHttpBackend(own.backend), open_account(spec), url=listed.url)

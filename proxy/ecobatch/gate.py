"""The continuous gate: one request at a time into engines that batch in flight (vLLM replicas).

Its loop:

* **busy engine** (something of ours in flight): a new request is released at once, up to the in-flight
  cap: joining the running decode steps is nearly free;
* **idle engine**: the window holds arrivals (``policy.window_length_s`` / ``should_close``) and
  releases them together, so they start, and end, close together and the GPU idles between groups
  (power is concave in concurrency: on the H200, holding only while idle saved 9-25 % of J/request
  where a fixed window of the same length saved 0-9 %);
* the **cap** is the policy's choice on the per-concurrency energy curve, under KV headroom and the
  SLO: at most that many sequences in flight, and **each slot frees the moment its own request ends**.

With several replicas (``backend.replicas``) each one has its own cap (its own KV headroom), its own
in-flight count, health and energy ledger; ``routing.choose_replica`` picks the replica for each
request (``pack``: the fullest one with room, so idle replicas stay idle), and "busy" / "idle" above
are that replica's. One engine is the one-replica case.

Each released request runs as its own task (``engine.generate`` on its replica); a client that leaves
cancels it, which aborts the request in the engine and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .admission import Outcome, Pending
from .backends.base import ContinuousEngine
from .clock import Clock
from .config import BatchingSettings
from .dispatcher import Dispatcher
from .domain import GenerationResult
from .energy.ledger import Ledger
from .energy.receipts import Receipts
from .errors import BackendFailed, ShuttingDown
from .metrics import Metrics
from .policy import Decision
from .profile import EnergyProfile
from .routing import ReplicaLoad, RoutingPolicy, choose_replica

__all__ = ["ContinuousGate", "Replica"]

#: while a replica is down, how often a gate waiting for room looks again (a replica coming back
#: frees no slot, so nothing else would wake it)
RECHECK_S = 0.5

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Replica:
    """One engine behind the gate, the ledger of its GPUs, and its sequences in flight."""

    name: str
    engine: ContinuousEngine
    ledger: Ledger
    inflight: int = 0

    @property
    def up(self) -> bool:
        return self.engine.health().get("state") == "up"


class ContinuousGate(Dispatcher):
    _engine: ContinuousEngine

    def __init__(
        self,
        engine: ContinuousEngine,
        ledger: Ledger,
        receipts: Receipts,
        metrics: Metrics,
        profile: EnergyProfile,
        settings: BatchingSettings,
        *,
        request_timeout_s: float,
        clock: Clock | None = None,
        replicas: Sequence[Replica] = (),
        routing: RoutingPolicy = "pack",
    ) -> None:
        super().__init__(
            engine,
            ledger,
            receipts,
            metrics,
            profile,
            settings,
            request_timeout_s=request_timeout_s,
            clock=clock,
        )
        self.replicas: list[Replica] = list(replicas) or [Replica("r0", engine, ledger)]
        self.routing: RoutingPolicy = routing
        self._last_choice = -1
        for replica in self.replicas:
            metrics.child(metrics.replica_inflight, replica.name).set(0)
            metrics.child(metrics.replica_requests, replica.name).inc(0)  # a series from the start
            metrics.child(metrics.replica_up, replica.name).set_function(_up_value(replica))

    async def _run(self) -> None:
        admission = self._admission
        while True:
            await admission.wait_for_work()
            head = admission.head()
            if head is None:
                continue
            decisions = self.replica_decisions()
            chosen = self._choose(decisions, head.request.sequences)
            if chosen is None:
                await self._wait_for_room()
                continue
            replica, decision = self.replicas[chosen], decisions[chosen]
            admission.last_decision = decision
            idle = replica.inflight == 0
            # an idle replica: hold the window, release the group together
            if idle and not await admission.collect(decision.batch_size, admission.deadline_s(decision)):
                continue
            self._release(self._assign(decisions, held=idle))

    def decide(self) -> Decision:
        """The policy's decision now (for the batching view): with several replicas, the first one's."""
        decision = self.replica_decisions()[0]
        self._admission.last_decision = decision
        return decision

    def replica_decisions(self) -> list[Decision]:
        """Each replica's cap now, under its own KV headroom and in-flight count."""
        return [self._admission.decide(r.inflight, headroom=r.engine.headroom()) for r in self.replicas]

    def _choose(
        self, decisions: list[Decision], sequences: int, excluded: frozenset[str] = frozenset()
    ) -> int | None:
        """``routing.choose_replica`` over the replicas (those ``excluded`` taken for down)."""
        loads = [
            ReplicaLoad(r.inflight, d.batch_size, r.up and r.name not in excluded)
            for r, d in zip(self.replicas, decisions, strict=True)
        ]
        return choose_replica(loads, sequences, self.routing, after=self._last_choice)

    async def _wait_for_room(self) -> None:
        self._room.clear()
        if len(self.replicas) > 1 and not all(r.up for r in self.replicas):
            await self._clock.wait(self._room, self._clock.now() + RECHECK_S)
        else:
            await self._room.wait()

    def _assign(self, decisions: list[Decision], *, held: bool) -> list[tuple[Pending, Replica]]:
        """Requests from the head of the queue, each with its replica, while one has room. After a
        window (``held``) the whole group goes; otherwise only requests that join a busy replica (one
        that would wake an idle replica waits for that replica's window in the next round)."""
        admission = self._admission
        group: list[tuple[Pending, Replica]] = []
        while (head := admission.head()) is not None:
            chosen = self._choose(decisions, head.request.sequences)
            if chosen is None:
                break
            replica = self.replicas[chosen]
            if replica.inflight == 0 and not held and group:
                break
            (pending,) = admission.take(head.request.sequences)
            replica.inflight += pending.request.sequences  # seen by the next choice in this round
            self._last_choice = chosen
            group.append((pending, replica))
        return group

    def _release(self, group: list[tuple[Pending, Replica]]) -> None:
        if not group:
            return
        dispatched_s, sequences = self._dispatched([pending for pending, _ in group])
        metrics = self._metrics
        for pending, replica in group:
            self._set_inflight(pending.request.sequences)
            metrics.child(metrics.replica_requests, replica.name).inc()
            metrics.child(metrics.replica_inflight, replica.name).set(replica.inflight)
            where = [replica]  # the replica running it (a failover moves it)
            task = asyncio.create_task(self._serve(pending, where, dispatched_s, sequences))
            self._tasks.add(task)
            # the slot frees when the task is done, even one cancelled before it ever ran
            task.add_done_callback(self._finisher(pending, where))
            pending.future.add_done_callback(_canceller(task))

    def _finisher(self, pending: Pending, where: list[Replica]) -> Callable[[asyncio.Task[None]], None]:
        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._running.pop(id(pending), None)  # a task cancelled before it ran never resolved it
            self._move(pending, where[0], None)
            self._set_inflight(-pending.request.sequences)
            if not pending.future.done():  # cancelled (shutdown) before it started
                pending.future.set_exception(ShuttingDown("ecobatch shut down before this request ran"))

        return finished

    def _move(self, pending: Pending, source: Replica, target: Replica | None) -> None:
        """The request's slot leaves ``source`` (for ``target``'s, in a failover)."""
        sequences, metrics = pending.request.sequences, self._metrics
        source.inflight -= sequences
        metrics.child(metrics.replica_inflight, source.name).set(source.inflight)
        if target is not None:
            target.inflight += sequences
            metrics.child(metrics.replica_inflight, target.name).set(target.inflight)
            metrics.child(metrics.replica_requests, target.name).inc()

    def _failover(self, tried: set[str], sequences: int) -> Replica | None:
        """Another replica, up and not tried yet, for a request whose connection was refused (it never
        reached an engine): as the routing would choose, else the least loaded one (it must run)."""
        others = [r for r in self.replicas if r.up and r.name not in tried]
        if not others:
            return None
        chosen = self._choose(self.replica_decisions(), sequences, excluded=frozenset(tried))
        return self.replicas[chosen] if chosen is not None else min(others, key=lambda r: r.inflight)

    async def _serve(
        self, pending: Pending, where: list[Replica], dispatched_s: float, group_size: int
    ) -> None:
        span, job = self._job(pending, where[0].ledger)
        result: GenerationResult | BaseException = ShuttingDown("ecobatch shut down while this request ran")
        tried: set[str] = set()
        try:
            async with asyncio.timeout(self._timeout_s):
                while True:
                    try:
                        result = await where[0].engine.generate(job)
                        break
                    except BackendFailed as exc:
                        tried.add(where[0].name)
                        target = (
                            self._failover(tried, pending.request.sequences) if exc.connect_failed else None
                        )
                        if target is None:
                            raise
                        log.warning(
                            "replica %s refused the connection; %s runs %s",
                            where[0].name,
                            target.name,
                            pending.request.id,
                        )
                        span.abandon()  # it never reached that engine: no share of its GPU's joules
                        self._move(pending, where[0], target)
                        where[0] = target
                        span, job = self._job(pending, target.ledger)
        except TimeoutError:
            result = self._timeout()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result = exc
        finally:
            self._resolve(pending, span, result, dispatched_s, group_size, where[0].inflight)


def _up_value(replica: Replica) -> Callable[[], float]:
    return lambda: 1.0 if replica.up else 0.0


def _canceller(task: asyncio.Task[None]) -> Callable[[asyncio.Future[Outcome]], None]:
    """A done-callback that stops ``task`` when the client's future is cancelled (the client left)."""

    def cancel(future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():
            task.cancel()

    return cancel

"""The continuous gate: requests released one by one into engines that batch in flight (vLLM replicas),
by the run-time controller.

Each round (an arrival, a completion, a timer, new settings) the gate packs what it knows into plain
values — what waits per tier, each replica's state (``pool.Replica``: in flight, other clients' work,
when its running requests are predicted to end, its safety limit), the live load estimates
(``load.LoadTracker``) — and calls ``release.plan_releases`` once. It applies the plan: each released
request runs as its own task that pulls the request's outputs from its replica (``engine.generate``),
handing a stream's to its HTTP handler without waiting (a slow client holds nothing); the slot frees the
moment that request ends; a client that leaves cancels it, which closes the engine's generator and so
aborts the request in the engine. Then it waits for the next event or the plan's wake-up time. The
plan's reasons are counted (``ecobatch_release_decisions_total``), logged at debug level and shown by
``GET /ecobatch/batching``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec

from ..clock import Clock
from ..config import BatchingSettings
from ..domain import GenerationRequest, GenerationResult, Tier
from ..energy.ledger import Span
from ..engines.base import ContinuousEngine, EngineShape
from ..engines.engine_output import Transcript
from ..errors import BackendFailed, ShuttingDown
from ..profile import EnergyProfile
from .admission import Outcome, Pending
from .dispatcher import Dispatcher
from .metrics import Metrics
from .pool import Replica, ReplicaPool
from .release import (
    UNLIMITED,
    Limit,
    LoadEstimate,
    Plan,
    ReleaseSettings,
    ReplicaState,
    inflight_limit,
    plan_releases,
    release_by_s,
    replicas_needed,
)
from .routing import ReplicaLoad, RoutingPolicy, choose_replica

__all__ = ["RECHECK_S", "ContinuousGate"]

#: while a replica is down, how often a gate waiting for room looks again (a replica coming back
#: frees no slot, so nothing else would wake it)
RECHECK_S = 0.5
#: decisions kept for the batching view
_RECENT = 32
#: vLLM's ``priority`` per tier (lower runs first), sent with ``backend.engine_priority``
ENGINE_PRIORITY: dict[Tier, int] = {"priority": -1, "interactive": 0, "flex": 1}

log = logging.getLogger(__name__)


class ContinuousGate(Dispatcher):
    shape: ClassVar[EngineShape] = "continuous"

    def __init__(
        self,
        pool: ReplicaPool,
        metrics: Metrics,
        profile: EnergyProfile,
        settings: BatchingSettings,
        *,
        request_timeout_s: float,
        clock: Clock | None = None,
        routing: RoutingPolicy = "pack",
        max_prompts_per_request: int = 64,
        engine_priority: bool = False,
    ) -> None:
        super().__init__(
            metrics,
            profile,
            settings,
            model=pool.model,
            request_timeout_s=request_timeout_s,
            clock=clock,
            max_prompts_per_request=max_prompts_per_request,
        )
        self.pool = pool
        self.replicas: list[Replica] = pool.replicas
        self.routing: RoutingPolicy = routing
        self.engine_priority = engine_priority
        self.last_plan: Plan | None = None
        self.limits: dict[str, Limit] = {}  # each replica's safety limit as last computed, by name
        self.recent: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self._last_choice = -1
        #: called with a leaving replica once nothing of ours runs on it (the runtime closes it then)
        self.on_drained: Callable[[Replica], None] | None = None
        for replica in self.replicas:
            self._track(replica)
        metrics.child(metrics.replicas_needed, self._model).set_function(self.scale_signal)

    # ---- replicas that come and go ---------------------------------------------------------------------
    def _track(self, replica: Replica) -> None:
        metrics = self._metrics
        metrics.child(metrics.replica_inflight, replica.name).set(0)
        metrics.child(metrics.replica_requests, replica.name).inc(0)  # a series from the start
        metrics.child(metrics.replica_up, replica.name).set_function(_up_value(replica))
        metrics.child(metrics.inflight_limit, replica.name).set(math.inf)  # none until one binds
        self.limits[replica.name] = Limit(UNLIMITED, "none")

    def join(self, replica: Replica) -> None:
        """A replica (started, serving the pool's model) takes requests from the next round on."""
        self.pool.add(replica)
        self._track(replica)
        self._last_choice = -1
        self._admission.arrived.set()  # news for the loop: room for what waits

    def stay(self, replica: Replica) -> None:
        """A leaving replica is listed again: it takes requests again from the next round."""
        replica.leaving = False
        self._last_choice = -1
        self._admission.arrived.set()

    def begin_leaving(self, replica: Replica) -> bool:
        """The replica takes no new request; True when nothing of ours runs on it (it can go now),
        else ``on_drained`` is called once its last request ends."""
        replica.leaving = True
        self._last_choice = -1
        return replica.occupancy.sequences == 0

    def forget(self, replica: Replica) -> None:
        """A replica that has left: out of the pool, its series gone."""
        self.pool.remove(replica)
        self.limits.pop(replica.name, None)
        self._last_choice = -1
        metrics = self._metrics
        for family in (
            metrics.replica_inflight,
            metrics.replica_requests,
            metrics.replica_up,
            metrics.inflight_limit,
        ):
            metrics.drop(family, replica.name)

    def _limit(self, replica: Replica) -> Limit:
        return self.limits.get(replica.name) or Limit(UNLIMITED, "none")

    # ---- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        admission, clock = self._admission, self._clock
        wake = admission.arrived
        while True:
            await admission.wait_for_work()
            wake.clear()  # whatever happens from here on wakes the next round
            now = clock.now()
            plan = self.plan(now)
            self._apply(plan, now)
            self._round_done()
            until = plan.wake_at_s
            if len(self.replicas) > 1 and not all(r.up for r in self.replicas):
                until = min(until if until is not None else math.inf, now + RECHECK_S)
            if until is None:
                await wake.wait()
            else:
                await clock.wait(wake, until)

    def scale_signal(self) -> float:
        """The scale signal (``release.replicas_needed``) from the live load, now: arrivals of every tier,
        their predicted length, the replicas' tightest limit and the engine's measured speed."""
        now = self._clock.now()
        sample = self.load.estimate(now).output_tokens_sample
        tokens = sum(sample) / len(sample) if sample else float(self.settings.expected_completion_tokens)
        limits = [self._limit(r).sequences for r in self.replicas if r.taking]
        return replicas_needed(
            self._profile,
            arrival_rate_per_s=self.load.rate_per_s(now),
            output_tokens_per_request=tokens,
            limit_sequences=min(limits, default=UNLIMITED),
            speed_factor=self.load.speed_factor,
        )

    def plan(self, now_s: float) -> Plan:
        """One call of the controller on the state now (no side effects but the limits shown)."""
        load = self.load.estimate(now_s)
        states = self._states(load)
        s = self.settings
        settings = ReleaseSettings.of(
            s,
            routing=self.routing,
            idle_power_w=self.replicas[0].ledger.idle_power_w or self._profile.idle_power_w or 0.0,
        )
        plan = plan_releases(
            now_s,
            self._admission.waiting(),
            states,
            load,
            self._profile,
            settings,
            last_replica=self._last_choice,
        )
        self.last_plan = plan
        return plan

    def _states(self, load: LoadEstimate) -> list[ReplicaState]:
        s = self.settings
        states = []
        tokens_per_sequence = self.load.kv_tokens_per_sequence
        for replica in self.replicas:
            occupancy = replica.occupancy
            other = replica.other_running()
            limit = inflight_limit(
                self._profile,
                kv_capacity_tokens=replica.engine.headroom().kv_capacity_tokens,
                kv_promised_tokens=occupancy.kv_tokens,
                other_sequences=other,
                tokens_per_sequence=tokens_per_sequence,
                tpot_slo_s=None if s.tpot_slo_ms is None else s.tpot_slo_ms / 1000.0,
                max_inflight=s.max_inflight_sequences,
                speed_factor=load.speed_factor,
            )
            if limit.sequences != self._limit(replica).sequences:
                value = math.inf if limit.sequences >= UNLIMITED else limit.sequences
                self._metrics.child(self._metrics.inflight_limit, replica.name).set(value)
            self.limits[replica.name] = limit
            states.append(
                ReplicaState(
                    up=replica.taking,
                    inflight=occupancy.sequences,
                    other_running=other,
                    busy_until_s=occupancy.busy_until_s(),
                    limit=limit,
                )
            )
        return states

    def _apply(self, plan: Plan, now_s: float) -> None:
        admission, metrics = self._admission, self._metrics
        group = len(plan.releases)
        if group:
            metrics.child(metrics.release_group, self._model).observe(
                sum(r.request.sequences for r in plan.releases)
            )
        for release in plan.releases:
            pending = release.request
            assert isinstance(pending, Pending)
            admission.remove(pending)
            replica = self.replicas[release.replica]
            self._last_choice = release.replica
            metrics.child(metrics.release_decisions, self._model, pending.tier, release.reason).inc()
            self._start(pending, replica, now_s, group)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "release %s tier=%s replica=%s reason=%s waited=%.3fs predicted_tokens=%.0f",
                    pending.request.id,
                    pending.tier,
                    replica.name,
                    release.reason,
                    now_s - pending.arrival_s,
                    pending.output_tokens,
                )
            self.recent.append(
                {
                    "request_id": pending.request.id,
                    "tier": pending.tier,
                    "action": "release",
                    "reason": release.reason,
                    "replica": replica.name,
                    "waited_s": round(now_s - pending.arrival_s, 4),
                }
            )
        for hold in plan.holds:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "hold %d %s until %s reason=%s predicted_saving=%.1fJ",
                    hold.count,
                    hold.tier,
                    "room" if hold.until_s is None else f"+{hold.until_s - now_s:.3f}s",
                    hold.reason,
                    hold.predicted_saving_j,
                )

    def _start(self, pending: Pending, replica: Replica, now_s: float, group_size: int) -> None:
        self._dispatched(pending, now_s)
        n = pending.sequences
        concurrency = replica.occupancy.sequences + n
        rate = self._profile.at(concurrency).tokens_per_s / concurrency * self.load.speed_factor
        ends_s = now_s + (pending.output_tokens / n) / max(rate, 1e-9)
        replica.start(id(pending), n, pending.kv_tokens, ends_s)
        self._set_inflight(n)
        metrics = self._metrics
        metrics.child(metrics.replica_requests, replica.name).inc()
        metrics.child(metrics.replica_inflight, replica.name).set(replica.occupancy.sequences)
        where = [replica]  # the replica running it (a failover moves it)
        task = asyncio.create_task(self._serve(pending, where, now_s, group_size))
        self._tasks.add(task)
        # the slot frees when the task is done, even one cancelled before it ever ran
        task.add_done_callback(self._finisher(pending, where))
        pending.future.add_done_callback(_canceller(task))

    def _budget_s(self, tier: Tier) -> float | None:
        s = self.settings
        return {"interactive": s.interactive_budget_s, "flex": s.flex_budget_s}.get(tier)

    # ---- one request -------------------------------------------------------------------------------
    def _finisher(self, pending: Pending, where: list[Replica]) -> Callable[[asyncio.Task[None]], None]:
        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._running.pop(id(pending), None)  # a task cancelled before it ran never resolved it
            self._leave(pending, where[0])
            self._set_inflight(-pending.sequences)
            if not pending.future.done():  # cancelled (shutdown) before it started
                pending.future.set_exception(ShuttingDown("ecobatch shut down before this request ran"))

        return finished

    def _leave(self, pending: Pending, replica: Replica) -> None:
        """The request's slot on ``replica`` frees (it ended, or a failover moved it)."""
        replica.finish(id(pending))
        self._metrics.child(self._metrics.replica_inflight, replica.name).set(replica.occupancy.sequences)
        if replica.leaving and replica.occupancy.sequences == 0 and self.on_drained is not None:
            self.on_drained(replica)

    def _failover(self, pending: Pending, tried: set[str]) -> Replica | None:
        """Another replica, up and not tried yet, for a request whose connection was refused (it never
        reached an engine): as the routing would choose, else the least loaded one (it must run)."""
        others = [r for r in self.replicas if r.taking and r.name not in tried]
        if not others:
            return None
        loads = [
            ReplicaLoad(r.inflight, self._limit(r).sequences, r.taking and r.name not in tried)
            for r in self.replicas
        ]
        chosen = choose_replica(loads, pending.sequences, self.routing, after=self._last_choice)
        return self.replicas[chosen] if chosen is not None else min(others, key=lambda r: r.inflight)

    def _engine_request(self, pending: Pending) -> GenerationRequest:
        """The request as the engine gets it: with ``backend.engine_priority``, its tier as vLLM's
        ``priority`` (unless the client set one)."""
        request = pending.request
        if not self.engine_priority or "priority" in request.body:
            return request
        body = {**request.body, "priority": ENGINE_PRIORITY[pending.tier]}
        return msgspec.structs.replace(request, body=body)

    async def _serve(
        self, pending: Pending, where: list[Replica], dispatched_s: float, group_size: int
    ) -> None:
        span = self._span(pending, where[0].account)
        request = self._engine_request(pending)
        result: GenerationResult | BaseException = ShuttingDown("ecobatch shut down while this request ran")
        tried: set[str] = set()
        try:
            async with asyncio.timeout(self._timeout_s):
                while True:
                    try:
                        result = await self._pull(pending, where[0].engine, request, span)
                        break
                    except BackendFailed as exc:
                        tried.add(where[0].name)
                        target = self._failover(pending, tried) if exc.connect_failed else None
                        if target is None:
                            raise
                        log.warning(
                            "replica %s refused the connection; %s runs %s",
                            where[0].name,
                            target.name,
                            pending.request.id,
                        )
                        self._move(pending, where[0], target)
                        span.abandon()  # it never reached that engine: no share of its GPU's joules
                        where[0] = target
                        span = self._span(pending, target.account)
        except TimeoutError:
            result = self._timeout()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result = exc
        finally:
            self._resolve(
                pending, where[0].account, span, result, dispatched_s, group_size, where[0].inflight
            )

    async def _pull(
        self, pending: Pending, engine: ContinuousEngine, request: GenerationRequest, span: Span
    ) -> GenerationResult:
        """Run the request on ``engine``, output by output, at the engine's speed: each one's tokens go on
        the energy ledger's clock as they come; a stream's outputs go to its handler without waiting for
        it (``OutputStream``: a slow client holds no slot, span or estimate; a stream's first output is its
        first token); the others are gathered into the result. Leaving early (the client left, a
        time-out) closes the engine's generator, which aborts the request there."""
        outputs = pending.outputs
        transcript = Transcript(request)
        async with contextlib.aclosing(engine.generate(request)) as generation:
            async for output in generation:
                span.generated(output.new_tokens)
                transcript.add(output)
                if outputs is not None:
                    if not pending.first_token_seen:
                        self._first_token(pending)
                    outputs.put_nowait(output)
        return transcript.result()

    def _move(self, pending: Pending, source: Replica, target: Replica) -> None:
        """The request's slot leaves ``source`` for ``target`` (a failover)."""
        ends_s = source.occupancy.ends_s(id(pending)) or self._clock.now()  # its own predicted end
        self._leave(pending, source)
        target.start(id(pending), pending.sequences, pending.kv_tokens, ends_s)
        metrics = self._metrics
        metrics.child(metrics.replica_inflight, target.name).set(target.occupancy.sequences)
        metrics.child(metrics.replica_requests, target.name).inc()

    # ---- the batching view -------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        now = self._clock.now()
        load = self.load.estimate(now)
        plan = self.last_plan
        waiting = self._admission.waiting()
        release = ReleaseSettings.of(self.settings)
        tiers = {}
        for tier, queue in waiting.items():
            tiers[tier] = {
                "waiting": len(queue),
                "oldest_wait_s": round(now - queue[0].arrival_s, 4) if queue else None,
                "next_release_by_in_s": (
                    round(release_by_s(queue[0], release, load) - now, 4) if queue else None
                ),
            }
        return {
            "engine_shape": "continuous",
            "settings": msgspec.structs.asdict(self.settings),
            "routing": self.routing,
            "inflight": self.inflight,
            "queue_depth": self.queue_depth,
            "load": {
                "arrival_rate_per_s": {
                    "priority+interactive": round(load.arrival_rate_per_s, 3),
                    "flex": round(self.load.rate_per_s(now, ("flex",)), 3),
                },
                "predicted_share_of_max_tokens": round(self.load.mean_share, 3),
                "mean_predicted_output_tokens": (
                    round(sum(load.output_tokens_sample) / len(load.output_tokens_sample), 1)
                    if load.output_tokens_sample
                    else None
                ),
                "engine_speed_vs_profile": round(load.speed_factor, 3),
                "engine_ttft_s": round(load.ttft_s, 4),
                "window_s": self.load.window_s,
            },
            "tiers": tiers,
            "holds": [
                {
                    "tier": h.tier,
                    "count": h.count,
                    "reason": h.reason,
                    "until_in_s": None if h.until_s is None else round(h.until_s - now, 4),
                    "predicted_saving_j": round(h.predicted_saving_j, 2),
                }
                for h in (plan.holds if plan else ())
            ],
            "replicas": [
                {
                    "name": r.name,
                    "up": r.up,
                    "inflight": r.inflight,
                    "limit": None if limit.sequences >= UNLIMITED else limit.sequences,
                    "limited_by": limit.binding(self.load.kv_tokens_per_sequence),
                    "kv_room_tokens": None if limit.kv_room_tokens is None else round(limit.kv_room_tokens),
                    "other_running": r.other_running(),
                    "busy_for_s": _busy_for(r, now),
                    "headroom": dataclasses.asdict(r.engine.headroom()),
                    "leaving": r.leaving,
                }
                for r, limit in ((r, self._limit(r)) for r in self.replicas)
            ],
            "recent_decisions": list(self.recent),
        }


def _busy_for(replica: Replica, now_s: float) -> float | None:
    until = replica.occupancy.busy_until_s()
    return None if until is None else round(max(0.0, until - now_s), 3)


def _up_value(replica: Replica) -> Callable[[], float]:
    return lambda: 1.0 if replica.up else 0.0


def _canceller(task: asyncio.Task[None]) -> Callable[[asyncio.Future[Outcome]], None]:
    """A done-callback that stops ``task`` when the client's future is cancelled (the client left)."""

    def cancel(future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():
            task.cancel()

    return cancel

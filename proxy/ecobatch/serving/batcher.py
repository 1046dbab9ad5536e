"""The static batcher: batch in, batch out, one batch on the GPU at a time (HF + bitsandbytes, simulated).

Its loop:

1. wait for the first arrival; the window opens at that request's arrival time;
2. ask the policy for a batch size (the energy curve per batch size, under KV headroom and the latency
   SLO: ``policy.choose_batch_size``);
3. hold the window until ``policy.window_closes_at_s`` says it closes (target reached, deadline passed,
   or no further arrival expected before the deadline); a ``priority`` request closes it at once;
4. take up to the batch size from the queue, priority first, as long as the group fits the engine
   (``batch_fits``: context length), and run it; the next window's arrivals queue meanwhile.

Tiers on a static engine: ``priority`` closes the window, ``flex`` is served as ``default`` (the
response says so): the batch is what the window gathered, whatever the tier.

A batch that times out fails every request in it with 504; a batch cancelled at shutdown fails them
with 503; the engine keeps the GPU until its worker has stopped (see ``hf_bnb``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, ClassVar

import msgspec

from ..clock import Clock
from ..config import BatchingSettings
from ..domain import Demand, GenerationResult, Usage
from ..energy.account import EnergyAccount
from ..energy.ledger import Span
from ..engines.base import EngineShape, Job, StaticEngine
from ..errors import BackendFailed, ShuttingDown
from ..profile import EnergyProfile
from .admission import Pending
from .dispatcher import Dispatcher, as_error
from .metrics import Metrics
from .policy import Decision, choose_batch_size, window_closes_at_s

__all__ = ["StaticBatcher"]


class _Demand:
    """Running means of prompt and completion tokens per sequence, seeded from the settings."""

    def __init__(self, prompt_tokens: float, completion_tokens: float, smoothing: float = 0.1) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self._smoothing = smoothing

    def observe(self, usage: Usage, sequences: int) -> None:
        a, n = self._smoothing, max(sequences, 1)
        self.prompt_tokens += a * (usage.prompt_tokens / n - self.prompt_tokens)
        self.completion_tokens += a * (max(usage.completion_tokens / n, 1.0) - self.completion_tokens)

    def now(self) -> Demand:
        return Demand(self.prompt_tokens, self.completion_tokens)


class StaticBatcher(Dispatcher):
    shape: ClassVar[EngineShape] = "static"

    def __init__(
        self,
        engine: StaticEngine,
        account: EnergyAccount,
        metrics: Metrics,
        profile: EnergyProfile,
        settings: BatchingSettings,
        *,
        request_timeout_s: float,
        clock: Clock | None = None,
        max_prompts_per_request: int = 64,
    ) -> None:
        super().__init__(
            metrics,
            profile,
            settings,
            model=engine.model,
            request_timeout_s=request_timeout_s,
            clock=clock,
            max_prompts_per_request=max_prompts_per_request,
            tiers=frozenset({"priority", "interactive"}),
        )
        self._engine = engine
        self._account = account  # the energy account of the engine's GPUs
        self._demand = _Demand(settings.expected_prompt_tokens, settings.expected_completion_tokens)
        self.last_decision: Decision | None = None

    async def _run(self) -> None:
        admission = self._admission
        while True:
            await admission.wait_for_work()
            decision = self.decide()
            self._round_done()
            if not await self._collect(decision):
                continue
            batch = admission.take(decision.batch_size, fits=self._engine.batch_fits)
            if batch:
                await self._run_batch(batch, decision)

    def decide(self) -> Decision:
        """The policy's batch size now (once per batch)."""
        s = self.settings
        decision = choose_batch_size(
            self._profile,
            self._engine.headroom(),
            self._demand.now(),
            slo_s=s.slo_ms / 1000.0,
            max_batch_sequences=s.max_batch_sequences,
            energy_tolerance=s.energy_tolerance,
        )
        self.last_decision = decision
        self._metrics.child(self._metrics.policy_batch_size, self._model).set(decision.batch_size)
        return decision

    async def _collect(self, decision: Decision) -> bool:
        """Hold the window open until it closes: True. False when the queue emptied or the settings
        changed meanwhile (the caller decides again)."""
        admission, clock, s = self._admission, self._clock, self.settings
        version = admission.settings_version
        opened_s = admission.oldest_arrival_s()
        while True:
            admission.waiting()  # drops the requests whose clients left
            opened = admission.oldest_arrival_s()
            if opened is None or admission.settings_version != version:
                return False
            now = clock.now()
            if admission.queues["priority"]:
                break
            closes_s = window_closes_at_s(
                opened_s=opened,
                now_s=now,
                collected=admission.queued_sequences,
                target=decision.batch_size,
                arrival_rate_per_s=admission.arrival_rate.per_s(now),
                window_min_s=s.window_min_ms / 1000.0,
                window_max_s=s.window_max_ms / 1000.0,
                slo_slack_s=s.slo_ms / 1000.0 - decision.expected_latency_s,
            )
            if closes_s <= now:
                break
            admission.arrived.clear()
            await clock.wait(admission.arrived, closes_s)
        start = opened_s if opened_s is not None else clock.now()
        self._metrics.child(self._metrics.window, self._model).observe(max(0.0, clock.now() - start))
        return True

    def view(self) -> dict[str, Any]:
        decision = self.last_decision
        return {
            "engine_shape": "static",
            "settings": msgspec.structs.asdict(self.settings),
            "last_decision": dataclasses.asdict(decision) if decision else None,
            "inflight": self.inflight,
            "queue_depth": self.queue_depth,
            "engine_headroom": dataclasses.asdict(self._engine.headroom()),
        }

    def _job(self, pending: Pending) -> tuple[Span, Job]:
        """The request's energy span and its job in the batch."""
        span = self._span(pending, self._account)
        return span, Job(
            pending.request, self._stream_sink(pending), span.generated, pending.future.cancelled
        )

    async def _run_batch(self, batch: list[Pending], decision: Decision) -> None:
        now = self._clock.now()
        sequences = sum(p.sequences for p in batch)
        metrics = self._metrics
        metrics.child(metrics.batch_size, self._model).observe(sequences)
        metrics.child(metrics.policy_decisions, self._model, decision.limited_by).inc()
        for pending in batch:
            self._dispatched(pending, now)
        started = [self._job(p) for p in batch]
        results: list[GenerationResult | BaseException] = [
            ShuttingDown("ecobatch shut down mid-batch")
        ] * len(batch)
        self._set_inflight(sequences)
        try:
            async with asyncio.timeout(self._timeout_s):
                answered = await self._engine.run_batch([job for _, job in started])
            if len(answered) != len(batch):
                raise BackendFailed(f"the engine returned {len(answered)} results for {len(batch)} requests")
            results = list(answered)
        except TimeoutError:
            results = [self._timeout()] * len(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            results = [as_error(exc)] * len(batch)
        finally:
            self._set_inflight(-sequences)
            for p, (span, _), result in zip(batch, started, results, strict=True):
                if isinstance(result, GenerationResult):
                    self._demand.observe(result.usage, p.sequences)
                # a failed member's estimate: decoded at the batch's speed, not alone
                self._resolve(p, self._account, span, result, now, sequences, in_flight=sequences)

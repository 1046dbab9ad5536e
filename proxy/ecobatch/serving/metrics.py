"""Every Prometheus metric ecobatch exports, created on an injected ``CollectorRegistry``.

Base units, ``_total`` on counters. J per 1k tokens is a PromQL ratio of two counters::

    1000 * sum(rate(ecobatch_energy_joules_total[5m]))
         / sum(rate(ecobatch_tokens_total{kind="completion"}[5m]))

Every energy series carries ``source`` = ``nvml`` or ``dcgm`` (measured) or ``model`` (from a profile),
so a modelled figure can never pass for a measured one on a dashboard. Energy reaches the metrics from
the ledger (``observe_settled``, ``observe_interval``), off the request path; tokens, group sizes and
waits are recorded by the dispatchers as they happen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..domain import TIERS, Usage
from ..energy.attribution import IntervalSplit
from ..energy.ledger import SettledRequest
from ..profile import EnergyProfile

__all__ = ["Metrics"]

_ENERGY_BUCKETS_J = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_JOULES_PER_KWH = 3.6e6


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        model: str,
        carbon_g_per_kwh: float,
        price_per_kwh: float,
        currency: str,
    ) -> None:
        self.registry = registry
        self._model = model
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._carbon_g_per_kwh = carbon_g_per_kwh
        self._price_per_kwh = price_per_kwh
        self._currency = currency
        r = registry
        self.request_energy = Histogram(
            "ecobatch_request_energy_joules",
            "Energy attributed to one served request, in joules, by tier (service_tier).",
            ["model", "source", "tier"],
            buckets=_ENERGY_BUCKETS_J,
            registry=r,
        )
        self.energy = Counter(
            "ecobatch_energy_joules",
            "Energy attributed to ecobatch's requests (idle and other work excluded), in joules.",
            ["model", "source", "gpu"],
            registry=r,
        )
        self.idle_energy = Counter(
            "ecobatch_idle_energy_joules",
            "Energy the GPU spent with nothing in flight (idle power × idle time), in joules.",
            ["source", "gpu"],
            registry=r,
        )
        self.unmeasured = Counter(
            "ecobatch_energy_unmeasured_seconds",
            "Seconds in which the energy counter could not be read (requests in them settle incomplete).",
            ["source", "gpu"],
            registry=r,
        )
        self.unattributed_energy = Counter(
            "ecobatch_unattributed_energy_joules",
            "Energy above idle power while none of ecobatch's requests was in flight: work another "
            "client sent to the same GPU, in joules.",
            ["source", "gpu"],
            registry=r,
        )
        self.tokens = Counter(
            "ecobatch_tokens", "Tokens processed, as reported by the engine.", ["model", "kind"], registry=r
        )
        self.batch_size = Histogram(
            "ecobatch_batch_size",
            "Sequences in one static batch (static engines: the GPU batch ecobatch sends).",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.release_group = Histogram(
            "ecobatch_release_group_sequences",
            "Sequences released together to a continuous engine in one round of the controller.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ecobatch_queue_wait_seconds",
            "Time from arrival to dispatch, by tier.",
            ["model", "tier"],
            buckets=_WAIT_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            "ecobatch_queue_depth", "Requests waiting in ecobatch, by tier.", ["model", "tier"], registry=r
        )
        self.ttft = Histogram(
            "ecobatch_time_to_first_token_seconds",
            "Streamed requests: time from arrival at ecobatch to the first generated token, by tier.",
            ["model", "tier"],
            buckets=(*_WAIT_BUCKETS_S, 60, 120),
            registry=r,
        )
        self.budget_misses = Counter(
            "ecobatch_budget_misses",
            "Requests whose first token came later than their tier's budget (batching.*_budget_ms) after "
            "arrival: measured on streams; otherwise the wait plus the engine's measured first-token time.",
            ["model", "tier"],
            registry=r,
        )
        self.release_decisions = Counter(
            "ecobatch_release_decisions",
            "Requests released to a continuous engine, by tier and by the controller's reason.",
            ["model", "tier", "reason"],
            registry=r,
        )
        self.inflight_limit = Gauge(
            "ecobatch_inflight_limit_sequences",
            "The safety limit on sequences in flight on each replica (KV room, TPOT objective, "
            "max_inflight_sequences); +Inf when nothing limits it.",
            ["replica"],
            registry=r,
        )
        self.replicas_needed = Gauge(
            "ecobatch_replicas_needed",
            "Replicas' worth of work in the live load, packed (continuous engines): the sequences it keeps "
            "in flight with each replica full, over what one replica holds at its limit. Fractional: sum it "
            "over ecobatch pods and round up to scale the engines (fewest replicas, fewest joules).",
            ["model"],
            registry=r,
        )
        self.window = Histogram(
            "ecobatch_window_seconds",
            "How long each batching window stayed open.",
            ["model"],
            buckets=_WAIT_BUCKETS_S,
            registry=r,
        )
        self.inflight = Gauge(
            "ecobatch_inflight_sequences",
            "Sequences dispatched to the engine and not finished.",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "ecobatch_requests", "Requests answered, by HTTP status.", ["model", "status"], registry=r
        )
        self.request_duration = Histogram(
            "ecobatch_request_duration_seconds",
            "Time from arrival to the last byte of the response.",
            ["model", "stream"],
            buckets=_DURATION_BUCKETS_S,
            registry=r,
        )
        self.power = Gauge(
            "ecobatch_gpu_power_watts",
            "GPU power over the last settled meter interval, in watts (modelled: from the profile).",
            ["source", "gpu"],
            registry=r,
        )
        self.idle_power = Gauge(
            "ecobatch_idle_power_watts",
            "The idle power the GPU's energy is split at: measured at start-up, then live whenever nothing "
            "runs (energy.live_idle), in watts.",
            ["source", "gpu"],
            registry=r,
        )
        self.co2 = Counter(
            "ecobatch_co2_grams",
            "CO2 for ecobatch's requests: attributed energy × energy.carbon_g_per_kwh.",
            ["model", "source"],
            registry=r,
        )
        self.cost = Counter(
            "ecobatch_energy_cost",
            "Energy cost of ecobatch's requests: attributed energy × energy.price_per_kwh.",
            ["model", "source", "currency"],
            registry=r,
        )
        self.policy_batch_size = Gauge(
            "ecobatch_policy_batch_size",
            "Static engines: the batch size the policy chose last.",
            ["model"],
            registry=r,
        )
        self.policy_decisions = Counter(
            "ecobatch_policy_decisions",
            "Static engines: batches by the constraint that set their size.",
            ["model", "limited_by"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "ecobatch_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 0.1 s): time every request waits for.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.replica_inflight = Gauge(
            "ecobatch_replica_inflight_sequences",
            "Sequences in flight on each vLLM replica (backend.replicas; one replica: 'r0').",
            ["replica"],
            registry=r,
        )
        self.replica_requests = Counter(
            "ecobatch_replica_requests",
            "Requests sent to each vLLM replica (one failed over after a refused connection counts on each).",
            ["replica"],
            registry=r,
        )
        self.replica_up = Gauge(
            "ecobatch_replica_up",
            "1 while a replica takes requests, 0 while its circuit breaker is open (ejected).",
            ["replica"],
            registry=r,
        )
        self.profile_info = Gauge(
            "ecobatch_profile_info",
            "The energy profile in use (value 1).",
            ["name", "source", "gpu", "model"],
            registry=r,
        )
        self.set_model(model)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, cached: the hot paths skip prometheus-client's lock and lookup."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def drop(self, metric: Any, *values: str) -> None:
        """A labelled series removed from ``metric`` (where it exists), its cached child with it (a new
        one is made if the same labels come back)."""
        with contextlib.suppress(KeyError):
            metric.remove(*values)
        self._children.pop((id(metric), values), None)

    def forget_gpu(self, meter: Any) -> None:
        """A replica's meter has closed for good: its gauges go (its counters stay, as totals)."""
        self.drop(self.power, meter.source, meter.gpu)
        self.drop(self.idle_power, meter.source, meter.gpu)

    def observe_request(self, status: str, stream: str, seconds: float) -> None:
        self.child(self.requests, self._model, status).inc()
        self.child(self.request_duration, self._model, stream).observe(seconds)

    def set_model(self, model: str) -> None:
        """The model label of every series from now on (a remote engine's name is known once it answers)."""
        previous, self._model = self._model, model
        for m in (self.inflight, self.policy_batch_size):
            if previous != model:  # no gauge left behind at 0 under the old name
                self.drop(m, previous)
            m.labels(model=model).set(0)
        for tier in TIERS:
            if previous != model:  # before the engine answered nothing ran: these series are empty
                self.drop(self.queue_depth, previous, tier)
                self.drop(self.budget_misses, previous, tier)
            self.queue_depth.labels(model=model, tier=tier).set(0)
            self.budget_misses.labels(model=model, tier=tier).inc(0)  # a series from the start

    @property
    def model(self) -> str:
        return self._model

    def describe_profile(self, profile: EnergyProfile) -> None:
        self.profile_info.labels(profile.name, profile.source, profile.gpu, profile.model).set(1)

    def observe_settled(self, settled: Sequence[SettledRequest], gpu: str) -> None:
        """Requests whose joules are final (those one call of a ledger settled): every request is
        charged, the energy, CO2 and cost counters moved once by their sum per source; only a delivered
        one (its client stayed) measured over its whole life is observed as a served request's energy."""
        model = self._model
        joules_by_source: dict[str, float] = {}
        for request in settled:
            source, joules = request.source, request.joules
            joules_by_source[source] = joules_by_source.get(source, 0.0) + joules
            if request.delivered and request.complete:
                self.child(self.request_energy, model, source, request.tier).observe(joules)
        for source, joules in joules_by_source.items():
            self.child(self.energy, model, source, gpu).inc(joules)
            kwh = joules / _JOULES_PER_KWH
            self.child(self.co2, model, source).inc(kwh * self._carbon_g_per_kwh)
            self.child(self.cost, model, source, self._currency).inc(kwh * self._price_per_kwh)

    def observe_interval(self, split: IntervalSplit, source: str, gpu: str) -> None:
        if split.gap:
            self.unmeasured.labels(source, gpu).inc(split.t1_s - split.t0_s)
            return
        self.idle_energy.labels(source, gpu).inc(split.idle_joules)
        self.unattributed_energy.labels(source, gpu).inc(split.unattributed_joules)
        seconds = split.t1_s - split.t0_s
        if seconds > 0:
            self.power.labels(source, gpu).set(split.joules / seconds)
        self.idle_power.labels(source, gpu).set(split.idle_power_w)

    def observe_tokens(self, usage: Usage) -> None:
        self.child(self.tokens, self._model, "prompt").inc(usage.prompt_tokens)
        self.child(self.tokens, self._model, "completion").inc(usage.completion_tokens)

"""A replica's energy account: the one writer of its requests' estimates and receipts.

One ``EnergyAccount`` per replica (a static engine has one): its meter and the ledger the meter feeds,
the profile its estimates come from, and where its figures go, the receipts store and the energy metrics
(both shared by every replica). Everything is given at construction: the account builds its meter and
ledger with the ledger reporting to it (``LedgerReports``), and nothing is assigned afterwards.

A request's energy, from its dispatch to its receipt:

* ``begin``: the request goes to this replica's GPUs: its span opens in the ledger;
* ``end``, called once by the dispatcher on every path. With the engine's count (``usage``) the span
  closes with it and the answer gets a **provisional** figure, the profile's J/token at the request's mean
  concurrency × its generated tokens (a model, labelled as one), also the request's **pending** receipt.
  Without it (its client left, a 502, a 504) the request is charged an **estimate** of its tokens, so that
  its neighbours do not pay for it (``estimated_usage``); tokens the engine reported as they came out are
  its count instead;
* once the ledger has split the counter's intervals up to the request's end it reports the request
  **settled**: its receipt turns settled and the energy metrics move, once per request, off the request
  path. Each interval's split (idle, other work, power) goes to the metrics as it is settled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

from ..domain import GenerationRequest, Usage
from ..profile import EnergyProfile
from .attribution import IntervalSplit
from .ledger import LedgerReports, SettledRequest, Span
from .meter import Meter
from .receipts import Receipts

__all__ = ["Charge", "EnergyAccount", "EnergyMetrics", "MeterBuilder", "estimated_usage"]

log = logging.getLogger(__name__)

#: builds an account's meter and its ledger, the ledger reporting where it is told
MeterBuilder = Callable[[LedgerReports], Meter]


class EnergyMetrics(Protocol):
    """Where settled energy is exported (``serving.metrics.Metrics``), by source and ``gpu`` label."""

    def observe_settled(self, settled: Sequence[SettledRequest], gpu: str) -> None: ...

    def observe_interval(self, split: IntervalSplit, source: str, gpu: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Charge:
    """What the end of a request with the engine's count gives its answer."""

    #: the profile's J/token at its mean concurrency × its generated tokens (modelled, until settled)
    provisional_joules: float
    #: where its settled joules come from (``nvml``, ``dcgm``, ``model``)
    source: str
    #: its mean sequences in flight over its life, itself included (the live load estimates learn it)
    concurrency: float


def estimated_usage(
    request: GenerationRequest, profile: EnergyProfile, ran_s: float, in_flight: int
) -> Usage:
    """The tokens of a request that ended without the engine's count after ``ran_s`` on an engine running
    ``in_flight`` sequences: its prompt (where the engine measured it), and what its sequences decode in
    that time at the profile's per-sequence rate at that concurrency, at most its ``max_tokens``."""
    running = max(in_flight, request.sequences, 1)
    per_sequence_tok_s = profile.at(running).tokens_per_s / running
    decoded = ran_s * per_sequence_tok_s * request.sequences
    if request.max_tokens is not None:
        decoded = min(decoded, request.max_tokens * request.sequences)
    return Usage(sum(request.prompt_tokens or ()), int(decoded))


class EnergyAccount:
    def __init__(
        self, receipts: Receipts, metrics: EnergyMetrics, profile: EnergyProfile, meter: MeterBuilder
    ) -> None:
        #: every request's receipt, for a client to look up by id (the store all replicas share)
        self.receipts = receipts
        self._metrics = metrics
        #: the profile its provisional figures and estimates come from
        self.profile = profile
        self.meter = meter(LedgerReports(settled=self._settled, interval=self._interval))
        self.ledger = self.meter.ledger

    @property
    def source(self) -> str:
        """Where its joules come from (``nvml``, ``dcgm``, ``model``)."""
        return self.ledger.source

    @property
    def gpu(self) -> str:
        """The ``gpu`` label of its series (the meter's)."""
        return self.meter.gpu

    # ---- the request path ----------------------------------------------------------------------
    def begin(self, request_id: str, sequences: int, tier: str) -> Span:
        """A request goes to this replica's GPUs now: its span, which ``end`` closes."""
        return self.ledger.begin(request_id, sequences, tier)

    @overload
    def end(
        self,
        span: Span,
        request: GenerationRequest,
        usage: Usage,
        *,
        delivered: bool,
        dispatched_s: float,
        in_flight: int,
    ) -> Charge: ...

    @overload
    def end(
        self, span: Span, request: GenerationRequest, usage: None, *, dispatched_s: float, in_flight: int
    ) -> None: ...

    def end(
        self,
        span: Span,
        request: GenerationRequest,
        usage: Usage | None,
        *,
        dispatched_s: float,
        in_flight: int,
        delivered: bool = False,
    ) -> Charge | None:
        """The request dispatched at ``dispatched_s`` ended now, with the engine's count (``usage``) or
        without it (None: it failed, its client left, it timed out; never delivered), with ``in_flight``
        sequences on its engine. With the count: its provisional figure, written as its pending receipt
        (``delivered``: whether its client got the answer). Without: it is charged the tokens it was seen
        to generate, else an estimate (``estimated_usage``)."""
        if usage is None:
            estimate = None
            if not span.tokens_seen:  # none reported as they came out: the ledger has no count to use
                ran_s = self.ledger.clock.now() - dispatched_s
                estimate = estimated_usage(request, self.profile, ran_s, in_flight)
            span.end(estimate, delivered=False, estimated=estimate is not None)
            return None
        concurrency = span.end(usage, delivered=delivered)
        provisional = self.profile.at(max(concurrency, 1.0)).joules_per_token * usage.completion_tokens
        try:  # bookkeeping beside the answer: its failure must not cost the client its result
            self.receipts.pending(span.request_id, provisional_joules=provisional, source=self.source)
        except Exception:
            log.exception("energy: the pending receipt of request %s failed", span.request_id)
        return Charge(provisional, self.source, concurrency)

    # ---- what the ledger reports, off the request path -----------------------------------------
    def _settled(self, settled: list[SettledRequest]) -> None:
        for request in settled:
            self.receipts.settle(request)
        self._metrics.observe_settled(settled, self.gpu)

    def _interval(self, split: IntervalSplit) -> None:
        self._metrics.observe_interval(split, self.source, self.gpu)

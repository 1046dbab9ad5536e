"""The two engine contracts, because engines come in two shapes. Both answer in no client's format
(``domain.EngineOutput``, ``domain.GenerationResult``); the HTTP layer renders OpenAI JSON.

* ``ContinuousEngine`` (``vllm-http``, ``vllm-async``): one request at a time, pulled, like vLLM's own
  ``EngineClient.generate``: ``generate(request)`` is an async generator of that request's
  ``EngineOutput``s (text deltas per sequence, the tokens generated since the previous output), the last
  one carrying the engine's usage; an error is raised from it. The engine batches whatever is in
  flight, so each request ends, and frees its slot, on its own. The gate pulls it at the engine's speed
  (a slow client must not hold the engine: its outputs wait in ``stream.OutputStream``), and closing the
  generator, or cancelling the task that pulls it,
  aborts the request in the engine.
* ``StaticEngine`` (``hf-bnb``, ``simulated``): batch in, batch out. The GPU batch is exactly the group
  the batcher sends; one batch runs at a time. ``run_batch`` returns, for each job, a
  ``GenerationResult`` or the exception that job met: one bad input never fails its neighbours.

Both share ``prepare``: validate a request against the engine's limits (context length) and tokenize
it, off the event loop, before it is queued, so a request that cannot run is answered 400 at once and
never joins, or delays, a batch. Both report their state as a typed ``EngineHealth``.

A static engine's ``Job`` carries a request with its callbacks: ``emit`` (a streamed request's outputs
as they come; its stream keeps them merged until taken),
``generated`` (n generated tokens came out now: the energy ledger's clock of the request's work) and
``cancelled`` (its client has gone: stop its work at the next chance).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import msgspec
from prometheus_client import CollectorRegistry

from ..domain import EngineOutput, GenerationRequest, GenerationResult, Headroom

__all__ = [
    "UP",
    "ContinuousEngine",
    "Emit",
    "Engine",
    "EngineHealth",
    "EngineShape",
    "HealthState",
    "Job",
    "Progress",
    "StaticEngine",
]

Emit = Callable[[EngineOutput], None]
#: start-up status (``start``): what the engine is waiting for, shown by /health
Progress = Callable[[str], None]
EngineShape = Literal["static", "continuous"]
HealthState = Literal["starting", "up", "down"]


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """An engine's state for /health and for routing (cheap to read: no I/O).

    ``down``: a remote engine whose circuit breaker is open (``failures_in_a_row`` failed requests or
    probes, the last one ``last_error``, for ``down_for_s``); ``starting``: not answered yet."""

    state: HealthState
    last_error: str | None = None
    upstream: str | None = None
    down_for_s: float | None = None
    failures_in_a_row: int = 0

    @property
    def up(self) -> bool:
        return self.state == "up"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the health of an engine with nothing that can fail apart from itself (in-process, simulated)
UP = EngineHealth("up")


def _ignore_tokens(tokens: int) -> None:
    return None


def _never() -> bool:
    return False


class Job(msgspec.Struct, frozen=True):
    """A request in a static engine's batch, with its callbacks."""

    request: GenerationRequest
    emit: Emit | None = None
    generated: Callable[[int], None] = _ignore_tokens
    cancelled: Callable[[], bool] = _never


class Engine(Protocol):
    #: "vllm-http", "simulated", …: a label for metrics and logs.
    name: str
    shape: ClassVar[EngineShape]
    #: An in-process engine's own Prometheus registry, served on ecobatch's /metrics beside its own
    #: (vllm-async: vLLM's ``vllm:*`` series); None for the others.
    metrics_registry: CollectorRegistry | None

    @property
    def model(self) -> str:
        """The model name clients use."""
        ...

    async def start(self, progress: Progress) -> None:
        """Get ready to serve; report what it is waiting for through ``progress`` (shown by /health)."""
        ...

    async def close(self) -> None: ...

    def headroom(self) -> Headroom:
        """The latest known KV headroom (cheap: polled in the background where it costs I/O)."""
        ...

    def health(self) -> EngineHealth:
        """The engine's state (cheap, no I/O)."""
        ...

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Check ``request`` against the engine's limits (raises ``BadRequest`` naming the field and the
        limit) and return it ready to queue (tokenized where the engine tokenizes)."""
        ...


@runtime_checkable
class StaticEngine(Engine, Protocol):
    def batch_fits(self, requests: Sequence[GenerationRequest]) -> bool:
        """Whether these prepared requests can run as one padded batch (context length)."""
        ...

    async def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult | BaseException]: ...


@runtime_checkable
class ContinuousEngine(Engine, Protocol):
    def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineOutput, None]:
        """The request's outputs as the engine makes them, the last with its usage; closing the
        generator aborts the request in the engine."""
        ...

"""The two engine contracts, because engines come in two shapes.

* ``StaticEngine`` (``hf-bnb``, ``simulated``): batch in, batch out. The GPU batch is exactly the group
  the batcher sends; one batch runs at a time. ``run_batch`` returns, for each job, a
  ``GenerationResult`` or the exception that job met: one bad input never fails its neighbours.
* ``ContinuousEngine`` (``vllm-http``, ``vllm-async``): one request at a time, like vLLM's own
  ``EngineClient.generate``: ``generate(job)`` returns that request's result (its stream's chunks went
  out through ``job.emit`` as they came) or raises its error. The engine batches whatever is in flight,
  so each request ends, and frees its slot, on its own. Cancelling the call aborts the request in the
  engine.

Both share ``prepare``: validate a request against the engine's limits (context length) and tokenize
it, off the event loop, before it is queued, so a request that cannot run is answered 400 at once and
never joins, or delays, a batch.

A ``Job`` carries a request with its callbacks: ``emit`` (stream chunks), ``progress`` (n generated
tokens came out now: the energy ledger's clock of the request's work) and ``cancelled`` (its client
has gone: stop its work at the next chance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from prometheus_client import CollectorRegistry

from ..domain import GenerationRequest, GenerationResult, Headroom

__all__ = ["ContinuousEngine", "Emit", "Engine", "EngineShape", "Job", "Progress", "StaticEngine"]

Emit = Callable[[dict[str, Any]], None]
Progress = Callable[[str], None]
EngineShape = Literal["static", "continuous"]


def _ignore_progress(tokens: int) -> None:
    return None


def _never() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Job:
    request: GenerationRequest
    emit: Emit | None = None
    progress: Callable[[int], None] = field(default=_ignore_progress)
    cancelled: Callable[[], bool] = field(default=_never)


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

    def health(self) -> dict[str, Any]:
        """The engine's state for /health: ``{"state": "up" | "down", …}`` (cheap, no I/O)."""
        ...

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Check ``request`` against the engine's limits (raises ``BadRequest`` naming the field and the
        limit) and return it ready to queue (tokenized where the engine tokenizes)."""
        ...


class StaticEngine(Engine, Protocol):
    def batch_fits(self, requests: Sequence[GenerationRequest]) -> bool:
        """Whether these prepared requests can run as one padded batch (context length)."""
        ...

    async def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult | BaseException]: ...


class ContinuousEngine(Engine, Protocol):
    async def generate(self, job: Job) -> GenerationResult: ...

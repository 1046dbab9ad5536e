"""The boundary between the batcher and an engine.

A backend receives a batch of validated requests and returns, for each, a ``GenerationResult`` (the
OpenAI response body and the engine's own token usage) or the exception that request met. Streaming
requests carry an ``emit`` callback that receives each OpenAI chunk as it is produced; their result's
``body`` is None. A backend never raises for one bad request: it returns that request's error in its
slot, so one input cannot fail its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..openai_api import GenerationRequest, Usage
from ..policy import Headroom

__all__ = ["Backend", "BatchItem", "Emit", "GenerationResult"]

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class BatchItem:
    request: GenerationRequest
    emit: Emit | None = None
    # True once the client has gone: a backend stops that request's work at its next chance.
    cancelled: Callable[[], bool] = lambda: False


@dataclass(frozen=True, slots=True)
class GenerationResult:
    usage: Usage
    body: dict[str, Any] | None = None


class Backend(Protocol):
    #: "vllm-http", "simulated", …: a label for metrics and logs.
    name: str
    #: True for engines that batch in flight (vLLM): the batcher then caps in-flight sequences instead
    #: of waiting for the previous batch to finish.
    continuous: bool

    @property
    def model(self) -> str:
        """The model name clients use."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def headroom(self) -> Headroom:
        """The latest known KV headroom (cheap: polled in the background where it costs I/O)."""
        ...

    async def generate(self, batch: Sequence[BatchItem]) -> list[GenerationResult | BaseException]: ...

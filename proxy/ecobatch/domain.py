"""Domain values that the HTTP layer, the engines, the energy ledger and the policy share.

Plain frozen dataclasses, no behaviour beyond arithmetic on their own fields, so that ``energy`` and
``backends`` never import the HTTP schema (``openai_api``) or the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "TIERS",
    "Demand",
    "GenerationRequest",
    "GenerationResult",
    "Headroom",
    "RequestKind",
    "Tier",
    "Usage",
]

RequestKind = Literal["completion", "chat"]
#: how long a request may wait, the OpenAI way (``service_tier``): ``interactive`` is ``auto`` /
#: ``default`` (a short budget), ``flex`` is deferrable (a long one), ``priority`` is never held
Tier = Literal["interactive", "flex", "priority"]
TIERS: tuple[Tier, ...] = ("priority", "interactive", "flex")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one request processed, as the engine counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One validated client request. ``body`` is the client's JSON (model resolved) for pass-through.

    ``prompt_tokens`` holds each sequence's prompt length once an engine has tokenized it (``prepare``);
    ``engine_input`` is whatever that engine wants to keep from preparing (token ids), opaque elsewhere.
    """

    id: str
    kind: RequestKind
    model: str
    created: int
    body: Mapping[str, Any]
    prompts: tuple[str, ...] = ()
    messages: tuple[Mapping[str, Any], ...] = ()
    max_tokens: int | None = None
    max_tokens_field: str = "max_tokens"
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    tier: Tier = "interactive"
    prompt_tokens: tuple[int, ...] | None = None
    engine_input: Any = field(default=None, compare=False, repr=False)

    @property
    def sequences(self) -> int:
        """How many sequences the engine runs for this request (a list prompt is several)."""
        return len(self.prompts) if self.kind == "completion" else 1


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What an engine returns for one request: the engine's own usage and the OpenAI response body
    (``None`` for a stream, whose chunks went out as they came)."""

    usage: Usage
    body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Headroom:
    """What the engine can still hold. ``None`` fields are unknown and limit nothing."""

    kv_free_tokens: int | None = None
    kv_capacity_tokens: int | None = None
    running: int | None = None
    waiting: int | None = None
    #: when the engine's figures were asked for (``time.monotonic()``; None: unknown): the running and
    #: waiting counts are as they stood at some moment between then and when this value was made
    read_at_s: float | None = None


@dataclass(frozen=True, slots=True)
class Demand:
    """The size of a typical request, in tokens (observed averages, or configured expectations)."""

    prompt_tokens: float
    completion_tokens: float

    @property
    def tokens_per_sequence(self) -> float:
        return self.prompt_tokens + self.completion_tokens

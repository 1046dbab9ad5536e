"""Domain values that the HTTP layer, the engines, the energy ledger and the policy share.

Plain frozen values, no behaviour beyond arithmetic on their own fields, so that ``energy`` and
``backends`` never import the HTTP schema (``openai_api``) or the policy: engines answer in
``EngineOutput`` and ``GenerationResult``, which the HTTP layer renders as OpenAI JSON. Those made for
every request or output (``GenerationRequest``, ``Usage``, ``GenerationResult``, ``EngineOutput``,
``TextDelta``) are frozen ``msgspec.Struct`` classes: immutable like frozen dataclasses, made (and
copied, ``msgspec.structs.replace``) far faster (docs/measured.md); the others are frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

__all__ = [
    "TIERS",
    "Demand",
    "EngineOutput",
    "GenerationRequest",
    "GenerationResult",
    "Headroom",
    "RequestKind",
    "TextDelta",
    "Tier",
    "Usage",
    "merge_outputs",
    "message_text",
]

RequestKind = Literal["completion", "chat"]
#: how long a request may wait, the OpenAI way (``service_tier``): ``interactive`` is ``auto`` /
#: ``default`` (a short budget), ``flex`` is deferrable (a long one), ``priority`` is never held
Tier = Literal["interactive", "flex", "priority"]
TIERS: tuple[Tier, ...] = ("priority", "interactive", "flex")


class Usage(msgspec.Struct, frozen=True):
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


class GenerationRequest(msgspec.Struct, frozen=True):
    """One validated client request. ``body`` is the client's JSON (model resolved) for pass-through.

    ``prompt_tokens`` holds each sequence's prompt length once an engine has tokenized it (``prepare``);
    ``engine_input`` is whatever that engine wants to keep from preparing (token ids), opaque elsewhere.
    A copy with some fields changed: ``msgspec.structs.replace(request, field=value)``.
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
    engine_input: Any = None

    @property
    def sequences(self) -> int:
        """How many sequences the engine runs for this request (a list prompt is several)."""
        return len(self.prompts) if self.kind == "completion" else 1


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a chat message whose content is a string or a list of text parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part["text"]) for part in content)


class TextDelta(msgspec.Struct, frozen=True):
    """Text one sequence (a prompt of a completion request; a chat's one answer) generated since its
    previous delta; ``finish_reason`` (``stop``, ``length``, ``abort``) on its last one."""

    index: int
    text: str = ""
    finish_reason: str | None = None


class EngineOutput(msgspec.Struct, frozen=True):
    """One step of a request's generation as an engine reports it, in no client's format.

    ``new_tokens``: tokens generated since the request's previous output, reported as they come out
    (the energy ledger's clock of the request's work; 0 where the engine only tells the total at the
    end). A request's last output carries ``usage``, the engine's own count. ``upstream``: an engine
    that already speaks the client's format (vllm-http: the upstream's OpenAI chunk or response as it
    came) keeps it here, so that what ecobatch does not interpret (logprobs, tool calls, vLLM's
    extensions) reaches the client unchanged; the HTTP layer passes it through instead of rendering
    the neutral fields."""

    deltas: tuple[TextDelta, ...] = ()
    new_tokens: int = 0
    usage: Usage | None = None
    upstream: Mapping[str, Any] | None = None


def merge_outputs(outputs: Sequence[EngineOutput]) -> EngineOutput:
    """Outputs of one request, in order, as one (a stream whose client has not taken them yet): each
    sequence's text joined once (linear in the text, however many outputs), tokens added, the last
    usage, each sequence's last finish reason. Pass-through payloads cannot be joined."""
    if any(o.upstream is not None for o in outputs):
        raise ValueError("outputs that carry an upstream payload cannot be merged")
    if len(outputs) == 1:
        return outputs[0]
    pieces: dict[int, list[str]] = {}
    reasons: dict[int, str | None] = {}
    usage: Usage | None = None
    for o in outputs:
        for d in o.deltas:
            pieces.setdefault(d.index, []).append(d.text)
            reasons[d.index] = d.finish_reason or reasons.get(d.index)
        usage = o.usage or usage
    deltas = tuple(TextDelta(i, "".join(texts), reasons[i]) for i, texts in pieces.items())
    return EngineOutput(deltas, sum(o.new_tokens for o in outputs), usage)


class GenerationResult(msgspec.Struct, frozen=True):
    """What an engine answers for one request, in no client's format: the engine's own usage, and each
    sequence's text and finish reason (none for a stream: its outputs went out as they came).
    ``upstream``: the upstream's own response body where the engine keeps it (see ``EngineOutput``)."""

    usage: Usage
    texts: tuple[str, ...] = ()
    finish_reasons: tuple[str | None, ...] = ()
    upstream: Mapping[str, Any] | None = None


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
    #: the engine's prompt + generated tokens since it started (vLLM's counters): whether it stepped
    #: between two readings (its running gauge is only updated when it steps, so it goes stale at rest)
    engine_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Demand:
    """The size of a typical request, in tokens (observed averages, or configured expectations)."""

    prompt_tokens: float
    completion_tokens: float

    @property
    def tokens_per_sequence(self) -> float:
        return self.prompt_tokens + self.completion_tokens

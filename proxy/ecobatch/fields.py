"""The request schema: which fields exist, which ecobatch reads (typed), and which each engine honours.

The fields ecobatch itself reads are declared once, as msgspec ``Struct``s (``ChatBody``,
``CompletionBody``: their types and limits); every engine honours them (``BASIC_FIELDS``). The other
fields OpenAI's completions / chat completions API and vLLM's extensions define are names only: ecobatch
passes them on and the engine answers for them (``vllm-http`` forwards them to vLLM, which validates
them; ``vllm-async`` gives ``SAMPLING_FIELDS`` to vLLM's ``SamplingParams``).

None is ever accepted and then ignored. A field nobody defines is an error (400, like OpenAI's
"unrecognized request argument"), unless ``backend.pass_unknown_fields`` lets a remote vLLM decide. A
field that exists but that an engine cannot honour is an error too, unless its value is neutral
(``presence_penalty: 0``, ``logprobs: false``, ``null``): a client that sends defaults is not refused,
one that asks for something it would not get is told so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from .domain import GenerationRequest
from .errors import BadRequest

__all__ = [
    "BASIC_FIELDS",
    "KNOWN",
    "SAMPLING_FIELDS",
    "VLLM_FIELDS",
    "ChatBody",
    "CompletionBody",
    "Message",
    "ServiceTierName",
    "check_fields",
]

# ---- the fields ecobatch reads: types and limits -------------------------------------------------
Role = Literal["system", "developer", "user", "assistant", "tool"]
#: ``service_tier`` as OpenAI's API spells it (``openai_api.SERVICE_TIERS``: the tier each is served in)
ServiceTierName = Literal["auto", "default", "flex", "priority"]
_MAX_STOP = 4
_Tokens = Annotated[int, Meta(ge=1)]
_NonEmpty = Annotated[str, Meta(min_length=1)]


class TextPart(Struct, frozen=True):
    type: Literal["text"]
    text: str


class Message(Struct, frozen=True):
    """A chat message as ecobatch reads it; its other keys (``tool_calls``, ``name``…) pass on as sent.
    ``content`` may be null only for an assistant message (``openai_api`` checks it)."""

    role: Role
    content: str | list[TextPart] | None = None


class StreamOptions(Struct, frozen=True):
    include_usage: bool | None = None


class _Common(Struct, frozen=True):
    """Fields both APIs share. ``null`` is the same as absent (the engine's default)."""

    model: str | None = None
    max_tokens: _Tokens | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: int | None = None
    stop: str | Annotated[list[_NonEmpty], Meta(max_length=_MAX_STOP)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    user: str | None = None
    service_tier: (
        Annotated[
            ServiceTierName,
            Meta(
                description="flex: cheaper and slower, may wait up to batching.flex_budget_ms; "
                "priority: never held"
            ),
        ]
        | None
    ) = None


class CompletionBody(_Common, frozen=True, kw_only=True):
    """A /v1/completions body: ``prompt`` is a string or a non-empty list of strings (token ids are not
    served)."""

    prompt: _NonEmpty | Annotated[list[_NonEmpty], Meta(min_length=1)]


class ChatBody(_Common, frozen=True, kw_only=True):
    """A /v1/chat/completions body; ``max_completion_tokens`` is the chat name for ``max_tokens``."""

    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: _Tokens | None = None


#: what every engine honours: the fields ecobatch reads (into ``GenerationRequest``)
BASIC_FIELDS = frozenset(CompletionBody.__struct_fields__) | frozenset(ChatBody.__struct_fields__)

# ---- the fields ecobatch passes on: names --------------------------------------------------------
_OPENAI_BOTH = frozenset({"presence_penalty", "frequency_penalty", "logit_bias", "logprobs"})
_OPENAI_COMPLETION = frozenset({"best_of", "echo", "suffix"})
_OPENAI_CHAT = frozenset(
    {
        "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions",
        "function_call", "store", "metadata", "modalities", "audio", "prediction", "reasoning_effort",
        "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
    }
)  # fmt: skip
#: vLLM's OpenAI server extensions (sampling and serving options), across its recent versions, each
#: once: True where vLLM's ``SamplingParams`` takes the field as it is (so the in-process engine
#: honours it too), False where only vLLM's OpenAI server reads it
VLLM_FIELDS: Mapping[str, bool] = {
    **dict.fromkeys(
        (
            "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
            "skip_special_tokens", "include_stop_str_in_output", "spaces_between_special_tokens",
        ),
        True,
    ),
    **dict.fromkeys(
        (
            "length_penalty", "bad_words", "allowed_token_ids", "truncate_prompt_tokens",
            "truncation_side", "prompt_logprobs", "use_beam_search", "return_tokens_as_token_ids",
            "return_token_ids", "add_special_tokens", "add_generation_prompt", "continue_final_message",
            "chat_template", "chat_template_kwargs", "documents", "mm_processor_kwargs", "response_format",
            "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
            "guided_decoding_backend", "guided_whitespace_pattern", "structural_tag", "priority",
            "request_id", "cache_salt", "kv_transfer_params", "vllm_xargs", "include_reasoning",
            "logprob_token_ids", "prompt_embeds", "thinking_token_budget",
        ),
        False,
    ),
}  # fmt: skip
#: what vLLM's ``SamplingParams`` takes as it is: OpenAI's penalties and bias, and vLLM's own
SAMPLING_FIELDS = frozenset({"presence_penalty", "frequency_penalty", "logit_bias"}) | frozenset(
    name for name, sampling in VLLM_FIELDS.items() if sampling
)
KNOWN: Mapping[str, frozenset[str]] = {
    "completion": frozenset(CompletionBody.__struct_fields__)
    | _OPENAI_BOTH
    | _OPENAI_COMPLETION
    | set(VLLM_FIELDS),
    "chat": frozenset(ChatBody.__struct_fields__) | _OPENAI_BOTH | _OPENAI_CHAT | set(VLLM_FIELDS),
}
_NEUTRAL: Mapping[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "length_penalty": 1,
    "top_k": -1,
    "min_p": 0,
    "min_tokens": 0,
    "best_of": 1,
    "top_logprobs": 0,
}


def _neutral(name: str, value: Any) -> bool:
    if value is None or value is False or value == {} or value == [] or value == "":
        return True
    return name in _NEUTRAL and value == _NEUTRAL[name]


def check_fields(
    request: GenerationRequest,
    supported: frozenset[str] | None,
    backend: str,
    *,
    allow_unknown: bool = False,
) -> None:
    """Refuse unknown fields, and known ones this engine would not honour (``supported=None``: all)."""
    known = KNOWN[request.kind]
    for name, value in request.body.items():
        if name not in known:
            if allow_unknown:
                continue
            raise BadRequest(
                f"unrecognized request argument supplied: '{name}' (neither OpenAI's API nor vLLM's "
                "extensions define it)",
                param=name,
            )
        if supported is not None and name not in supported and not _neutral(name, value):
            raise BadRequest(
                f"'{name}' is not supported by the {backend} backend; it would be ignored, so it is "
                "refused (vllm-http passes it to vLLM)",
                param=name,
            )

"""Which request fields exist, and which each engine honours: none is ever accepted and then ignored.

A field that neither OpenAI's completions / chat completions API nor vLLM's extensions define is an
error (400, like OpenAI's "unrecognized request argument"), unless ``backend.pass_unknown_fields`` lets
a remote vLLM decide. A field that exists but that an engine cannot honour is an error too, unless its
value is neutral (``presence_penalty: 0``, ``logprobs: false``, ``null``): a client that sends defaults
is not refused, one that asks for something it would not get is told so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .domain import GenerationRequest
from .errors import BadRequest

__all__ = ["BASIC_FIELDS", "check_fields"]

_OPENAI_BOTH = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user",
    }
)  # fmt: skip
_OPENAI_COMPLETION = frozenset({"prompt", "best_of", "echo", "suffix", "service_tier"})
_OPENAI_CHAT = frozenset(
    {
        "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "functions", "function_call", "store", "metadata", "modalities", "audio",
        "prediction", "reasoning_effort", "service_tier", "web_search_options", "verbosity",
        "prompt_cache_key", "safety_identifier",
    }
)  # fmt: skip
#: vLLM's OpenAI server extensions (sampling and serving options), across its recent versions
_VLLM = frozenset(
    {
        "ignore_eos", "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens",
        "stop_token_ids", "bad_words", "allowed_token_ids", "include_stop_str_in_output",
        "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
        "truncation_side", "prompt_logprobs", "use_beam_search", "return_tokens_as_token_ids",
        "return_token_ids", "add_special_tokens", "add_generation_prompt", "continue_final_message",
        "chat_template", "chat_template_kwargs", "documents", "mm_processor_kwargs", "response_format",
        "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "guided_whitespace_pattern", "structural_tag", "priority",
        "request_id", "cache_salt", "kv_transfer_params", "vllm_xargs", "include_reasoning",
        "logprob_token_ids", "prompt_embeds", "thinking_token_budget",
    }
)  # fmt: skip
KNOWN: Mapping[str, frozenset[str]] = {
    "completion": _OPENAI_BOTH | _OPENAI_COMPLETION | _VLLM,
    "chat": _OPENAI_BOTH | _OPENAI_CHAT | _VLLM,
}
#: what every engine honours (parsed into ``GenerationRequest``)
BASIC_FIELDS = frozenset(
    {
        "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "n", "stop", "stream", "stream_options", "seed", "ignore_eos", "user", "service_tier",
    }
)  # fmt: skip
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

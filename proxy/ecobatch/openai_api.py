"""OpenAI API shapes: validate request bodies (before anything is queued), and render what engines answer
(``GenerationResult``, ``EngineOutput``: no client's format) as OpenAI responses and stream chunks.

Validation errors are ``BadRequest`` naming the field (``messages[1].content``), so a bad input is
answered with a 400 and never joins, or hangs, a batch. An engine that keeps its upstream's own OpenAI
JSON (vllm-http) has it passed through under ecobatch's request id and model name, its usage shown only
where the client asked for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .domain import EngineOutput, GenerationRequest, GenerationResult, Tier, Usage
from .errors import BadRequest, ModelNotFound

__all__ = [
    "SERVICE_TIERS",
    "SERVICE_TIER_NAMES",
    "ChunkRenderer",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "models_response",
    "parse_chat",
    "parse_completion",
    "response_body",
]

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_MAX_STOP = 4
#: ``service_tier`` as OpenAI's API spells it, and the tier each one is served in
SERVICE_TIERS: dict[str, Tier] = {
    "auto": "interactive",
    "default": "interactive",
    "flex": "flex",
    "priority": "priority",
}
#: the ``service_tier`` a response names for the tier that served it
SERVICE_TIER_NAMES: dict[Tier, str] = {"interactive": "default", "flex": "flex", "priority": "priority"}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def _get(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise BadRequest(f"'{name}' must be {what}, got {value!r}", param=name)
    if not isinstance(value, kinds):
        raise BadRequest(f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


def _number_in(body: Mapping[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = _get(body, name, (int, float), "a number")
    if value is None:
        return default
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}'={value} must be between {lo} and {hi}", param=name)
    return float(value)


def _common(body: Mapping[str, Any], served_model: str, max_tokens_field: str) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    model = _get(body, "model", (str,), "a string")
    if model is not None and model != served_model:
        raise ModelNotFound(
            f"The model '{model}' does not exist; this server serves '{served_model}'", param="model"
        )
    max_tokens = _get(body, max_tokens_field, (int,), "an integer")
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens_field = "max_tokens"  # report the field the client actually sent
        max_tokens = _get(body, "max_tokens", (int,), "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"'{max_tokens_field}'={max_tokens} must be >= 1", param=max_tokens_field)
    n = _get(body, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise BadRequest(
            f"'n'={n} is not supported: ecobatch batches single sequences; send {n} requests instead",
            param="n",
        )
    stop_raw = _get(body, "stop", (str, list), "a string or a list of strings")
    stop: tuple[str, ...] = ()
    if isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list):
        if len(stop_raw) > _MAX_STOP or not all(isinstance(s, str) and s for s in stop_raw):
            raise BadRequest(f"'stop' must be at most {_MAX_STOP} non-empty strings", param="stop")
        stop = tuple(stop_raw)
    stream = bool(_get(body, "stream", (bool,), "a boolean"))
    options = _get(body, "stream_options", (dict,), "an object")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        iu = options.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise BadRequest(
                "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage"
            )
        include_usage = bool(iu)
    seed = _get(body, "seed", (int,), "an integer")
    tier_name = _get(body, "service_tier", (str,), "a string")
    if tier_name is not None and tier_name not in SERVICE_TIERS:
        raise BadRequest(
            f"'service_tier'={tier_name!r} is not served here; use one of {', '.join(SERVICE_TIERS)} "
            "(flex: cheaper and slower, may wait up to batching.flex_budget_ms; priority: never held)",
            param="service_tier",
        )
    ignore_eos = bool(_get(body, "ignore_eos", (bool,), "a boolean"))
    for name in ("presence_penalty", "frequency_penalty"):
        _number_in(body, name, -2.0, 2.0, 0.0)
    _get(body, "user", (str,), "a string")
    resolved = dict(body)
    resolved["model"] = served_model
    return {
        "model": served_model,
        "body": resolved,
        "max_tokens": max_tokens,
        "max_tokens_field": max_tokens_field if max_tokens is not None else "max_tokens",
        "temperature": _number_in(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number_in(body, "top_p", 0.0, 1.0, 1.0),
        "stop": stop,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "stream": stream,
        "include_usage": include_usage,
        "tier": SERVICE_TIERS[tier_name] if tier_name is not None else "interactive",
    }


def parse_completion(body: Any, served_model: str) -> GenerationRequest:
    """Validate a /v1/completions body: ``prompt`` is a string or a non-empty list of strings."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: tuple[str, ...] = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
        empty = next((i for i, p in enumerate(prompts) if not p), None)
        if empty is not None:
            raise BadRequest(f"'prompt[{empty}]' must not be empty", param=f"prompt[{empty}]")
    elif prompt is None:
        raise BadRequest("'prompt' is required", param="prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise BadRequest("'prompt' as token ids is not supported; send text", param="prompt")
    else:
        raise BadRequest("'prompt' must be a string or a non-empty list of strings", param="prompt")
    if prompts == ("",):
        raise BadRequest("'prompt' must not be empty", param="prompt")
    common = _common(body, served_model, "max_tokens")
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # the OpenAI API's default for completions
    return GenerationRequest(
        id=_new_id("cmpl"), kind="completion", created=int(time.time()), prompts=prompts, **common
    )


def parse_chat(body: Any, served_model: str) -> GenerationRequest:
    """Validate a /v1/chat/completions body: ``messages`` is a non-empty list of {role, content}."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise BadRequest(f"'{where}' must be an object with 'role' and 'content'", param=where)
        if m.get("role") not in _ROLES:
            raise BadRequest(
                f"'{where}.role'={m.get('role')!r} must be one of {sorted(_ROLES)}", param=f"{where}.role"
            )
        content = m.get("content")
        if content is None and m.get("role") == "assistant":
            continue
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (
                    isinstance(part, Mapping)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise BadRequest(
                        f"'{where}.content[{j}]' must be {{'type': 'text', 'text': str}}",
                        param=f"{where}.content[{j}]",
                    )
        elif not isinstance(content, str):
            raise BadRequest(
                f"'{where}.content' must be a string or a list of text parts", param=f"{where}.content"
            )
    common = _common(body, served_model, "max_completion_tokens")
    return GenerationRequest(
        id=_new_id("chatcmpl"), kind="chat", created=int(time.time()), messages=tuple(messages), **common
    )


def completion_response(
    request: GenerationRequest, texts: Sequence[str], finish_reasons: Sequence[str | None], usage: Usage
) -> dict[str, Any]:
    return {
        "id": request.id,
        "object": "text_completion",
        "created": request.created,
        "model": request.model,
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finish_reasons, strict=True))
        ],
        "usage": usage.to_dict(),
    }


def chat_response(
    request: GenerationRequest, text: str, finish_reason: str | None, usage: Usage
) -> dict[str, Any]:
    return {
        "id": request.id,
        "object": "chat.completion",
        "created": request.created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.to_dict(),
    }


def _chunk(
    request: GenerationRequest, obj: str, choices: list[dict[str, Any]], usage: Usage | None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request.id,
        "object": obj,
        "created": request.created,
        "model": request.model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage.to_dict()
    return chunk


def chat_chunk(
    request: GenerationRequest,
    delta: Mapping[str, Any] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One chat stream chunk; ``delta=None`` with ``usage`` gives the final usage-only chunk."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}]
    )
    return _chunk(request, "chat.completion.chunk", choices, usage)


def completion_chunk(
    request: GenerationRequest,
    index: int | None,
    text: str = "",
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One completion stream chunk; ``index=None`` with ``usage`` gives the final usage-only chunk."""
    choices = (
        []
        if index is None
        else [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    )
    return _chunk(request, "text_completion", choices, usage)


def models_response(model: str, owned_by: str = "ecobatch") -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": int(time.time()), "owned_by": owned_by}],
    }


def response_body(request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    """The response to a request that did not stream."""
    if result.upstream is not None:
        body = dict(result.upstream)
        body["id"], body["model"] = request.id, request.model
        return body
    if request.kind == "chat":
        return chat_response(request, result.texts[0], result.finish_reasons[0], result.usage)
    return completion_response(request, result.texts, result.finish_reasons, result.usage)


class ChunkRenderer:
    """A stream's engine outputs as OpenAI chunks, in order: a chat stream opens with the assistant's
    role; the final usage is a chunk of its own where the client asked for it
    (``stream_options.include_usage``)."""

    __slots__ = ("_request", "_role_sent")

    def __init__(self, request: GenerationRequest) -> None:
        self._request = request
        self._role_sent = False

    def chunks(self, output: EngineOutput) -> list[dict[str, Any]]:
        request = self._request
        if output.upstream is not None:
            return _passed_through(request, output.upstream)
        chunks = []
        if request.kind == "chat":
            if not self._role_sent:
                chunks.append(chat_chunk(request, {"role": "assistant", "content": ""}))
                self._role_sent = True
            for d in output.deltas:
                if d.text or d.finish_reason is not None:
                    chunks.append(chat_chunk(request, {"content": d.text} if d.text else {}, d.finish_reason))
            if output.usage is not None and request.include_usage:
                chunks.append(chat_chunk(request, None, usage=output.usage))
        else:
            for d in output.deltas:
                if d.text or d.finish_reason is not None:
                    chunks.append(completion_chunk(request, d.index, d.text, d.finish_reason))
            if output.usage is not None and request.include_usage:
                chunks.append(completion_chunk(request, None, usage=output.usage))
        return chunks


def _passed_through(request: GenerationRequest, upstream: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An upstream's own chunk under ecobatch's id and model; its usage only where the client asked for
    it (a usage-only chunk is then dropped)."""
    chunk = dict(upstream)
    if "usage" in chunk and not request.include_usage:
        if chunk["usage"] and not chunk.get("choices"):
            return []
        del chunk["usage"]
    chunk["id"], chunk["model"] = request.id, request.model
    return [chunk]

"""OpenAI API shapes: validate request bodies (before anything is queued), and render what engines answer
(``GenerationResult``, ``EngineOutput``: no client's format) as OpenAI responses and stream chunks.

A body is decoded once (``msgspec.json.decode``, in the HTTP layer) and checked against its schema
(``fields.ChatBody``, ``fields.CompletionBody``) by ``msgspec.convert``; the decoded body itself is kept
for the engines that pass it on. Validation errors are ``BadRequest`` naming the field
(``messages[1].content``) and the limit, so a bad input is answered with a 400 and never joins, or
hangs, a batch. An engine that keeps its upstream's own OpenAI JSON (vllm-http) has it passed through
under ecobatch's request id and model name, its usage shown only where the client asked for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ..domain import EngineOutput, GenerationRequest, GenerationResult, Tier, Usage
from ..errors import BadRequest, ModelNotFound
from ..fields import ChatBody, CompletionBody, ServiceTierName
from ..validation import MISSING, explain, value_at

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

#: ``service_tier`` as OpenAI's API spells it, and the tier each one is served in
SERVICE_TIERS: dict[ServiceTierName, Tier] = {
    "auto": "interactive",
    "default": "interactive",
    "flex": "flex",
    "priority": "priority",
}
#: the ``service_tier`` a response names for the tier that served it
SERVICE_TIER_NAMES: dict[Tier, str] = {"interactive": "default", "flex": "flex", "priority": "priority"}


class _RequestIds:
    """Request ids: a prefix and 96 random bits (``os.urandom``) in hex, unique and unguessable. The
    random bytes are drawn ``IDS_PER_DRAW`` ids at a time, one system call for all of them rather than
    one per request; a forked child draws its own."""

    IDS_PER_DRAW = 1024
    _HEX_DIGITS = 24  # 12 random bytes

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._hex, self._at = "", 0

    def new(self, prefix: str) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(self.IDS_PER_DRAW * self._HEX_DIGITS // 2).hex(), 0
        self._at = at + self._HEX_DIGITS
        return f"{prefix}-{self._hex[at : at + self._HEX_DIGITS]}"


_new_id = _RequestIds().new


def _bad_request(error: msgspec.ValidationError, schema: type[Any], body: Any) -> BadRequest:
    """The 400 for a body that does not fit ``schema``: ``param`` is the field, the message its limit."""
    invalid = explain(error, schema)
    param = invalid.path or None
    name = f"'{invalid.path}'" if invalid.path else "the request body"
    if invalid.problem == "type":
        if not invalid.path:
            return BadRequest(f"the request body must be a JSON object, got {invalid.got}")
        return BadRequest(f"{name} must be {invalid.limit}, got {invalid.got}", param=param)
    if invalid.problem == "missing":
        return BadRequest(f"{name} is required", param=param)
    if invalid.problem == "limit":
        value = value_at(body, invalid.path)
        shown = "" if value is MISSING or isinstance(value, dict | list) else f"={value!r}"
        return BadRequest(f"{name}{shown} must be {invalid.limit}", param=param)
    return BadRequest(f"{name}: {invalid.limit}", param=param)


def _common(fields: ChatBody | CompletionBody, body: Mapping[str, Any], served_model: str) -> dict[str, Any]:
    """What both APIs share, past the schema: the model, ``n``, ``stream_options`` and the tier."""
    if fields.model is not None and fields.model != served_model:
        raise ModelNotFound(
            f"The model '{fields.model}' does not exist; this server serves '{served_model}'", param="model"
        )
    if fields.n is not None and fields.n != 1:
        raise BadRequest(
            f"'n'={fields.n} is not supported: ecobatch batches single sequences; send {fields.n} requests "
            "instead",
            param="n",
        )
    if fields.stream_options is not None and not fields.stream:
        raise BadRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    stop = fields.stop
    return {
        "model": served_model,
        "body": {**body, "model": served_model},
        "temperature": 1.0 if fields.temperature is None else fields.temperature,
        "top_p": 1.0 if fields.top_p is None else fields.top_p,
        "stop": (stop,) if isinstance(stop, str) else tuple(stop or ()),
        "seed": fields.seed,
        "ignore_eos": bool(fields.ignore_eos),
        "stream": bool(fields.stream),
        "include_usage": bool(fields.stream_options and fields.stream_options.include_usage),
        "tier": "interactive" if fields.service_tier is None else SERVICE_TIERS[fields.service_tier],
    }


def parse_completion(body: Any, served_model: str) -> GenerationRequest:
    """Validate a decoded /v1/completions body (``fields.CompletionBody``)."""
    try:
        fields = msgspec.convert(body, CompletionBody)
    except msgspec.ValidationError as exc:
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            raise BadRequest("'prompt' as token ids is not supported; send text", param="prompt") from None
        raise _bad_request(exc, CompletionBody, body) from None
    return GenerationRequest(
        id=_new_id("cmpl"),
        kind="completion",
        created=int(time.time()),
        prompts=(fields.prompt,) if isinstance(fields.prompt, str) else tuple(fields.prompt),
        max_tokens=16 if fields.max_tokens is None else fields.max_tokens,  # the OpenAI API's default
        **_common(fields, body, served_model),
    )


def parse_chat(body: Any, served_model: str) -> GenerationRequest:
    """Validate a decoded /v1/chat/completions body (``fields.ChatBody``)."""
    try:
        fields = msgspec.convert(body, ChatBody)
    except msgspec.ValidationError as exc:
        raise _bad_request(exc, ChatBody, body) from None
    for i, message in enumerate(fields.messages):
        if message.content is None and message.role != "assistant":
            raise BadRequest(
                f"'messages[{i}].content' must be a string or a list of text parts (null only for an "
                "assistant message)",
                param=f"messages[{i}].content",
            )
    max_tokens, max_tokens_field = fields.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:  # report the field the client actually sent
        max_tokens, max_tokens_field = fields.max_tokens, "max_tokens"
    return GenerationRequest(
        id=_new_id("chatcmpl"),
        kind="chat",
        created=int(time.time()),
        messages=tuple(body["messages"]),
        max_tokens=max_tokens,
        max_tokens_field=max_tokens_field,
        **_common(fields, body, served_model),
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

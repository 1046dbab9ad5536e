"""Engine limits checked before a request is queued: the context length.

vLLM refuses ``prompt tokens + max_tokens`` beyond ``max_model_len``; every backend here refuses it the
same way, with a 400 that names the field the client sent and the limit, before the request can join
(or, with a static engine, stall) a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ..domain import GenerationRequest
from ..errors import BadRequest

__all__ = ["check_max_tokens", "fit_to_context"]


def fit_to_context(
    request: GenerationRequest, prompt_tokens: Sequence[int], context_tokens: int, default_max_tokens: int
) -> GenerationRequest:
    """``request`` with its prompt lengths recorded and ``max_tokens`` resolved (the client's, or
    ``default_max_tokens`` capped to the room the longest prompt leaves); raises ``BadRequest`` when a
    prompt and its ``max_tokens`` do not fit in ``context_tokens``."""
    longest = max(prompt_tokens, default=0)
    prompt_param = "prompt" if request.kind == "completion" else "messages"
    if longest >= context_tokens:
        raise BadRequest(
            f"the prompt is {longest} tokens; the model's context is {context_tokens} tokens, which must "
            "hold the prompt and at least one generated token",
            param=prompt_param,
        )
    room = context_tokens - longest
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif max_tokens > room:
        field = request.max_tokens_field
        raise BadRequest(
            f"'{field}'={max_tokens} with a {longest}-token prompt exceeds the model's context of "
            f"{context_tokens} tokens; ask for at most {room}",
            param=field,
        )
    return msgspec.structs.replace(request, prompt_tokens=tuple(prompt_tokens), max_tokens=max_tokens)


def check_max_tokens(request: GenerationRequest, context_tokens: int) -> None:
    """Without the prompt's length (a remote engine tokenizes it): refuse a ``max_tokens`` that cannot
    fit ``context_tokens`` even beside a one-token prompt."""
    if request.max_tokens is not None and request.max_tokens >= context_tokens:
        field = request.max_tokens_field
        raise BadRequest(
            f"'{field}'={request.max_tokens} cannot fit the model's context of {context_tokens} tokens "
            f"beside a prompt; ask for at most {context_tokens - 1}",
            param=field,
        )

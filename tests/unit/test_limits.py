"""Context-length checks before queuing: 400s that name the field the client sent and the limit."""

from __future__ import annotations

import pytest

from ecobatch.engines.limits import check_max_tokens, fit_to_context
from ecobatch.errors import BadRequest
from ecobatch.serving.openai_api import parse_chat, parse_completion


def test_a_request_that_fits_gets_its_prompt_lengths_and_max_tokens() -> None:
    fitted = fit_to_context(parse_completion({"prompt": ["a", "b"], "max_tokens": 10}, "m"), [5, 7], 20, 256)
    assert (fitted.prompt_tokens, fitted.max_tokens) == ((5, 7), 10)


def test_max_tokens_past_the_context_names_the_field_and_the_limit() -> None:
    request = parse_completion({"prompt": "x", "max_tokens": 100_000_000}, "m")
    with pytest.raises(
        BadRequest,
        match=r"'max_tokens'=100000000 with a 3-token prompt exceeds the model's context of 4096 tokens; "
        r"ask for at most 4093",
    ) as info:
        fit_to_context(request, [3], 4096, 256)
    assert info.value.param == "max_tokens"


def test_the_field_named_is_the_one_the_client_sent() -> None:
    chat = parse_chat({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 999}, "m")
    with pytest.raises(BadRequest) as info:
        fit_to_context(chat, [2], 100, 256)
    assert info.value.param == "max_completion_tokens"
    legacy = parse_chat({"messages": [{"role": "user", "content": "x"}], "max_tokens": 999}, "m")
    with pytest.raises(BadRequest) as info:
        fit_to_context(legacy, [2], 100, 256)
    assert info.value.param == "max_tokens"


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    with pytest.raises(BadRequest, match="the prompt is 100 tokens") as info:
        fit_to_context(parse_chat({"messages": [{"role": "user", "content": "x"}]}, "m"), [100], 100, 16)
    assert info.value.param == "messages"


def test_without_max_tokens_the_default_is_capped_to_the_room_left() -> None:
    fitted = fit_to_context(parse_chat({"messages": [{"role": "user", "content": "x"}]}, "m"), [90], 100, 256)
    assert fitted.max_tokens == 10


def test_without_the_prompt_length_max_tokens_alone_must_leave_room_for_one_token() -> None:
    check_max_tokens(parse_completion({"prompt": "x", "max_tokens": 511}, "m"), 512)
    with pytest.raises(BadRequest, match="ask for at most 511"):
        check_max_tokens(parse_completion({"prompt": "x", "max_tokens": 512}, "m"), 512)

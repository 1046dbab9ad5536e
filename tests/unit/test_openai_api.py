from __future__ import annotations

from typing import Any

import pytest

from ecobatch.errors import BadRequest, ModelNotFound
from ecobatch.serving.openai_api import parse_chat, parse_completion

MODEL = "m"


def chat(**kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


def test_a_request_without_model_uses_the_served_model() -> None:
    req = parse_chat(chat(), MODEL)
    assert req.model == MODEL
    assert req.body["model"] == MODEL


def test_a_list_prompt_is_several_sequences() -> None:
    req = parse_completion({"prompt": ["a", "b", "c"]}, MODEL)
    assert req.sequences == 3
    assert req.max_tokens == 16  # the OpenAI default for completions


def test_stream_options_include_usage_is_read() -> None:
    req = parse_chat(chat(stream=True, stream_options={"include_usage": True}), MODEL)
    assert req.stream and req.include_usage


def test_max_completion_tokens_is_the_chat_name_for_max_tokens() -> None:
    assert parse_chat(chat(max_completion_tokens=7), MODEL).max_tokens == 7
    assert parse_chat(chat(max_tokens=9), MODEL).max_tokens == 9


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "top_p": "high"}, "top_p"),
        ({"prompt": "x", "stop": [1]}, "stop[0]"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
    ],
)
def test_bad_completion_fields_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_completion(body, MODEL)
    assert info.value.param == param
    assert info.value.status == 400
    assert param.split(".")[0] in info.value.message


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hi", "messages"),
        ([], "messages"),
        ([5], "messages[0]"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 5}], "messages[1].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type"),
    ],
)
def test_bad_messages_are_named(messages: Any, param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_chat({"messages": messages}, MODEL)
    assert info.value.param == param


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(BadRequest, match="JSON object"):
        parse_chat([1, 2], MODEL)


def test_another_model_name_is_a_404() -> None:
    with pytest.raises(ModelNotFound) as info:
        parse_chat(chat(model="gpt-4"), MODEL)
    assert info.value.status == 404
    assert info.value.to_body()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (chat(max_tokens="10"), "max_tokens", "'max_tokens' must be an integer or null, got a string"),
        (chat(stream=1), "stream", "'stream' must be a boolean or null, got an integer"),
        (chat(temperature=3), "temperature", "'temperature'=3 must be <= 2.0"),
        (chat(top_p=-0.5), "top_p", "'top_p'=-0.5 must be >= 0.0"),
        (chat(max_completion_tokens=0), "max_completion_tokens", "'max_completion_tokens'=0 must be >= 1"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "'stop' must be a list of length <= 4"),
        (
            chat(service_tier="gold"),
            "service_tier",
            "'service_tier'='gold' must be one of ['auto', 'default', 'flex', 'priority']",
        ),
        (
            {"messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            "'messages[0].role'='wizard'",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "null only for an assistant message"),
        ({"messages": []}, "messages", "'messages' must be a non-empty list"),
    ],
)
def test_an_error_names_the_field_and_its_limit(body: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_chat(body, MODEL)
    assert info.value.param == param
    assert says in info.value.message


def test_the_body_passed_on_keeps_every_field_as_the_client_sent_it() -> None:
    """ecobatch reads its own fields; the rest (tool calls, vLLM's extensions) reach the engine intact,
    and vLLM answers for them."""
    messages = [
        {"role": "user", "content": "what is 6 x 7?", "name": "ada"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    body = {"model": MODEL, "messages": messages, "top_k": "not vLLM's business here", "tools": [{}]}
    request = parse_chat(body, MODEL)
    assert request.body == body
    assert list(request.messages) == messages


def test_every_service_tier_the_schema_accepts_is_served_in_a_tier() -> None:
    from typing import get_args

    from ecobatch.fields import ServiceTierName
    from ecobatch.serving.openai_api import SERVICE_TIERS

    for name in get_args(ServiceTierName):
        assert parse_chat(chat(service_tier=name), MODEL).tier == SERVICE_TIERS[name]
    assert set(SERVICE_TIERS) == set(get_args(ServiceTierName))

from __future__ import annotations

from typing import Any

import pytest

from ecobatch.errors import BadRequest, ModelNotFound
from ecobatch.openai_api import parse_chat, parse_completion

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
        ({"prompt": "x", "stop": [1]}, "stop"),
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
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
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

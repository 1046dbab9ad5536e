"""No request field is accepted and then ignored: unknown ones are refused, and so are known ones an
engine cannot honour, unless their value is neutral."""

from __future__ import annotations

import pytest

from ecobatch.errors import BadRequest
from ecobatch.fields import BASIC_FIELDS, check_fields
from ecobatch.serving.openai_api import parse_chat, parse_completion

CHAT = {"messages": [{"role": "user", "content": "x"}]}


def test_an_unknown_field_is_refused_by_name() -> None:
    request = parse_completion({"prompt": "x", "temprature": 0.5}, "m")
    with pytest.raises(BadRequest, match="unrecognized request argument supplied: 'temprature'") as info:
        check_fields(request, None, "vllm-http")
    assert info.value.param == "temprature"
    check_fields(request, None, "vllm-http", allow_unknown=True)


@pytest.mark.parametrize(
    ("field", "value"), [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 10})]
)
def test_a_field_the_engine_would_ignore_is_refused(field: str, value: object) -> None:
    request = parse_chat({**CHAT, field: value}, "m")
    with pytest.raises(BadRequest, match=f"'{field}' is not supported by the simulated backend") as info:
        check_fields(request, BASIC_FIELDS, "simulated")
    assert info.value.param == field
    check_fields(request, None, "vllm-http")  # vLLM honours it


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 0),
        ("frequency_penalty", 0.0),
        ("logit_bias", {}),
        ("logprobs", False),
        ("tools", None),
    ],
)
def test_neutral_values_are_accepted_everywhere(field: str, value: object) -> None:
    check_fields(parse_chat({**CHAT, field: value}, "m"), BASIC_FIELDS, "simulated")


def test_vllm_extensions_are_known_fields() -> None:
    request = parse_completion({"prompt": "x", "top_k": 5, "min_p": 0.1, "ignore_eos": True}, "m")
    check_fields(request, None, "vllm-http")
    with pytest.raises(BadRequest, match="'top_k' is not supported by the hf-bnb backend"):
        check_fields(request, BASIC_FIELDS, "hf-bnb")


def test_empty_prompts_are_refused_by_position() -> None:
    with pytest.raises(BadRequest) as info:
        parse_completion({"prompt": ["fine", ""]}, "m")
    assert info.value.param == "prompt[1]"
    with pytest.raises(BadRequest) as info:
        parse_completion({"prompt": ""}, "m")
    assert info.value.param == "prompt"

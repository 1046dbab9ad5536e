"""The HTTP layer renders what engines answer (no client's format) as OpenAI responses and stream chunks;
an upstream's own OpenAI JSON passes through under ecobatch's id and model, its usage only where the
client asked for it."""

from __future__ import annotations

from typing import Any

from ecobatch.domain import EngineOutput, GenerationResult, TextDelta, Usage
from ecobatch.serving.openai_api import ChunkRenderer, parse_chat, parse_completion, response_body

MODEL = "served"


def chat(**body: Any) -> Any:
    return parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, MODEL)


def test_a_chat_stream_opens_with_the_role_then_its_text_then_the_usage_it_asked_for() -> None:
    request = chat(stream=True, stream_options={"include_usage": True})
    render = ChunkRenderer(request)
    chunks = [
        *render.chunks(EngineOutput((TextDelta(0, "Hel"),), 1)),
        *render.chunks(EngineOutput((TextDelta(0, "lo", "stop"),), 1)),
        *render.chunks(EngineOutput(usage=Usage(5, 2))),
    ]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
    ]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 7
    assert {c["id"] for c in chunks} == {request.id} and {c["model"] for c in chunks} == {MODEL}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_a_stream_that_did_not_ask_for_usage_gets_no_usage_chunk() -> None:
    request = parse_completion({"prompt": ["a", "b"], "stream": True}, MODEL)
    render = ChunkRenderer(request)
    chunks = [
        *render.chunks(EngineOutput((TextDelta(1, "x"), TextDelta(0, "y", "length")), 2)),
        *render.chunks(EngineOutput(usage=Usage(2, 2))),
    ]
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks] == [(1, "x"), (0, "y")]
    assert all("usage" not in c for c in chunks)


def test_an_upstream_chunk_passes_through_with_our_id_and_model_and_the_usage_only_when_asked() -> None:
    upstream = {
        "id": "cmpl-upstream",
        "model": "/models/mistral",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": {"content": [{"token": "x"}]}}],
        "usage": None,
    }
    usage_only = {"id": "cmpl-upstream", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    quiet = ChunkRenderer(chat(stream=True))
    [chunk] = quiet.chunks(EngineOutput((TextDelta(0, "x"),), 1, upstream=upstream))
    assert chunk["id"] != "cmpl-upstream" and chunk["model"] == MODEL
    assert chunk["choices"] == upstream["choices"], "what ecobatch does not interpret reaches the client"
    assert "usage" not in chunk
    assert quiet.chunks(EngineOutput(usage=Usage(1, 1), upstream=usage_only)) == []
    asked = ChunkRenderer(chat(stream=True, stream_options={"include_usage": True}))
    [usage_chunk] = asked.chunks(EngineOutput(usage=Usage(1, 1), upstream=usage_only))
    assert usage_chunk["usage"] == usage_only["usage"]
    assert upstream["id"] == "cmpl-upstream", "the engine's payload is not changed in place"


def test_a_response_is_rendered_from_the_texts_or_passed_through_from_the_upstream() -> None:
    completion = parse_completion({"prompt": ["a", "b"]}, MODEL)
    body = response_body(completion, GenerationResult(Usage(2, 3), ("x", "yz"), ("stop", "length")))
    assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [("x", "stop"), ("yz", "length")]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    request = chat()
    body = response_body(request, GenerationResult(Usage(1, 1), ("hi",), ("stop",)))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    upstream = {"id": "up", "model": "up-model", "choices": [{"message": {"tool_calls": []}}], "usage": {}}
    body = response_body(request, GenerationResult(Usage(1, 1), ("",), (None,), upstream=upstream))
    assert (body["id"], body["model"]) == (request.id, MODEL)
    assert body["choices"] == upstream["choices"]

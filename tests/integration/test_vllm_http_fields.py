"""vllm-http passes the fields ecobatch does not read to vLLM as the client sent them, and vLLM answers
for them: ecobatch validates only what it reads itself."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ecobatch.config import load_settings
from ecobatch.serving.app import create_app


def recording_vllm(received: list[dict[str, Any]]) -> web.Application:
    """A vLLM that keeps every body it is sent and, as vLLM does, refuses a ``top_k`` that is not an
    integer."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "up", "object": "model"}]})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="vllm:kv_cache_usage_perc 0.1\n")

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        received.append(body)
        if "top_k" in body and not isinstance(body["top_k"], int):
            error = {"message": "top_k must be an integer", "type": "BadRequestError", "param": "top_k"}
            return web.json_response({"error": error}, status=400)
        message = {"role": "assistant", "content": "hi"}
        return web.json_response(
            {
                "id": "up-1",
                "object": "chat.completion",
                "model": "up",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def proxy_for(
    received: list[dict[str, Any]], aiohttp_server: Any, aiohttp_client: Any, **more: Any
) -> Any:
    upstream = await aiohttp_server(recording_vllm(received))
    overrides = {
        "backend.kind": "vllm-http",
        "backend.upstream": str(upstream.make_url("")).rstrip("/"),
        "energy.meter": "model",
        **more,
    }
    return await aiohttp_client(create_app(load_settings(None, overrides)))


MESSAGES = [
    {"role": "user", "content": "6 x 7?", "name": "ada"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
    {"role": "tool", "content": "42", "tool_call_id": "c1"},
]


async def test_vllm_only_fields_reach_vllm_as_sent(aiohttp_server: Any, aiohttp_client: Any) -> None:
    received: list[dict[str, Any]] = []
    client = await proxy_for(received, aiohttp_server, aiohttp_client)
    extras = {"top_k": 5, "min_p": 0.1, "chat_template_kwargs": {"enable_thinking": False}, "tools": [{}]}
    resp = await client.post("/v1/chat/completions", json={"messages": MESSAGES, **extras})
    assert resp.status == 200, await resp.text()
    assert received == [{"messages": MESSAGES, **extras, "model": "up"}]


async def test_vllm_answers_for_a_bad_vllm_only_field(aiohttp_server: Any, aiohttp_client: Any) -> None:
    received: list[dict[str, Any]] = []
    client = await proxy_for(received, aiohttp_server, aiohttp_client)
    resp = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "top_k": "many"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "top_k" and "top_k must be an integer" in error["message"]
    assert received[0]["top_k"] == "many", "vLLM, not ecobatch, judged it"


async def test_a_field_nobody_defines_passes_only_when_allowed(
    aiohttp_server: Any, aiohttp_client: Any
) -> None:
    received: list[dict[str, Any]] = []
    client = await proxy_for(received, aiohttp_server, aiohttp_client)
    resp = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "temprature": 0.5})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "temprature"
    assert received == []
    client = await proxy_for(
        received, aiohttp_server, aiohttp_client, **{"backend.pass_unknown_fields": True}
    )
    resp = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "temprature": 0.5})
    assert resp.status == 200 and received[0]["temprature"] == 0.5

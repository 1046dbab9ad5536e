"""vllm-http against a misbehaving upstream: 5xx → 502, a hang → 504, a 4xx keeps its status; each a
clear OpenAI error, never a 500 or a hang."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ecobatch.config import load_settings
from ecobatch.serving.app import create_app


def fake_vllm(mode: str) -> web.Application:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "up", "object": "model"}]})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="vllm:kv_cache_usage_perc 0.5\n")

    async def generate(request: web.Request) -> web.StreamResponse:
        if mode == "cut":  # a stream that dies after its first chunk
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {
                "id": "x",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": "hi"}}],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            return response
        if mode == "garbage":
            return web.Response(text="<html>proxy error</html>", status=200)
        if mode == "500":
            return web.json_response({"error": {"message": "CUDA error: out of memory"}}, status=500)
        if mode == "hang":
            await asyncio.sleep(30)
        return web.json_response(
            {"error": {"message": "max_tokens is too large", "param": "max_tokens"}}, status=400
        )

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    return app


async def proxy_for(mode: str, aiohttp_server: Any, aiohttp_client: Any) -> Any:
    upstream = await aiohttp_server(fake_vllm(mode))
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.upstream": str(upstream.make_url("")).rstrip("/"),
            "backend.request_timeout_s": 0.5,
            "energy.meter": "model",
        },
    )
    return await aiohttp_client(create_app(settings))


async def test_an_upstream_5xx_is_a_502_with_its_message(aiohttp_server: Any, aiohttp_client: Any) -> None:
    client = await proxy_for("500", aiohttp_server, aiohttp_client)
    resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["type"] == "upstream_error" and "out of memory" in error["message"]


async def test_an_upstream_that_hangs_is_a_504(aiohttp_server: Any, aiohttp_client: Any) -> None:
    client = await proxy_for("hang", aiohttp_server, aiohttp_client)
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 504
    assert "request_timeout_s" in (await resp.json())["error"]["message"]


async def test_an_upstream_4xx_keeps_its_status_and_param(aiohttp_server: Any, aiohttp_client: Any) -> None:
    client = await proxy_for("400", aiohttp_server, aiohttp_client)
    responses = await asyncio.gather(
        *(client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 9}) for i in range(3))
    )
    for resp in responses:  # each its own upstream request, each refused with its own status
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["param"] == "max_tokens" and error["type"] == "invalid_request_error"


async def test_the_upstream_model_name_is_discovered(aiohttp_server: Any, aiohttp_client: Any) -> None:
    client = await proxy_for("400", aiohttp_server, aiohttp_client)
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["up"]


async def test_a_stream_cut_mid_way_ends_with_an_error_event_then_done(
    aiohttp_server: Any, aiohttp_client: Any
) -> None:
    from tests.integration.helpers import sse_events

    client = await proxy_for("cut", aiohttp_server, aiohttp_client)
    resp = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    events = sse_events(await resp.text())
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[-1] == "[DONE]"
    assert (
        events[-2]["error"]["type"] == "upstream_error" and "before [DONE]" in events[-2]["error"]["message"]
    )


async def test_a_malformed_reply_is_a_502(aiohttp_server: Any, aiohttp_client: Any) -> None:
    client = await proxy_for("garbage", aiohttp_server, aiohttp_client)
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 502
    assert "malformed JSON" in (await resp.json())["error"]["message"]


async def test_an_upstream_that_stops_answering_opens_the_breaker_and_recovery_closes_it(
    aiohttp_server: Any, aiohttp_client: Any
) -> None:
    """Requests get a fast 503 (not a queue and a time-out) while the upstream is down; the proxy
    recovers by itself when the upstream answers again."""
    state = {"down": False}

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "up", "object": "model"}]})

    async def metrics(_: web.Request) -> web.Response:
        if state["down"]:
            return web.Response(status=503, text="engine dead")
        return web.Response(text="vllm:kv_cache_usage_perc 0.5\n")

    async def chat(_: web.Request) -> web.Response:
        body = {
            "id": "x",
            "object": "chat.completion",
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat)
    upstream = await aiohttp_server(app)
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.upstream": str(upstream.make_url("")).rstrip("/"),
            "backend.headroom_poll_s": 0.05,
            "backend.breaker_failures": 2,
            "energy.meter": "model",
            "batching.interactive_budget_ms": 0.0,
        },
    )
    client = await aiohttp_client(create_app(settings))
    chat_body = {"messages": [{"role": "user", "content": "x"}]}
    assert (await client.post("/v1/chat/completions", json=chat_body)).status == 200
    state["down"] = True
    for _ in range(50):
        health = await client.get("/health")
        if health.status == 503:
            break
        await asyncio.sleep(0.05)
    body = await health.json()
    assert body["status"] == "upstream_down" and body["engine"]["state"] == "down"
    assert "HTTP 503" in body["engine"]["last_error"]
    t0 = asyncio.get_running_loop().time()
    refused = await client.post("/v1/chat/completions", json=chat_body)
    assert refused.status == 503 and int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["error"]["code"] == "upstream_down"
    assert asyncio.get_running_loop().time() - t0 < 0.5, "a down upstream is refused at once"
    state["down"] = False
    for _ in range(50):
        if (await client.get("/health")).status == 200:
            break
        await asyncio.sleep(0.05)
    assert (await client.post("/v1/chat/completions", json=chat_body)).status == 200


async def test_a_refused_connection_takes_the_upstream_down_at_once(aiohttp_client: Any) -> None:
    """Nothing listens there: the breaker opens on the first refusal, not after breaker_failures."""
    from ecobatch.serving.app import RUNTIME

    upstream, port = await aiohttp_server_stub()
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.upstream": f"http://127.0.0.1:{port}",
            "backend.breaker_failures": 3,
            "backend.headroom_poll_s": 30.0,  # no probe in this test: the request alone opens it
            "energy.meter": "model",
            "batching.interactive_budget_ms": 0.0,
        },
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    await upstream.cleanup()  # the upstream goes away after start-up
    first = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert first.status == 502 and "connection refused" in (await first.json())["error"]["message"]
    assert app[RUNTIME].engine.health().state == "down"
    second = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert second.status == 503 and (await second.json())["error"]["code"] == "upstream_down"


async def aiohttp_server_stub() -> tuple[web.AppRunner, int]:
    """A minimal vLLM stand-in on a free port, started (stop it with ``cleanup``), and its port."""
    from ecobatch.testing.servers import free_port

    runner = web.AppRunner(fake_vllm("400"))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port

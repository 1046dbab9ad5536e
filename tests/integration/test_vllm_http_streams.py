"""vllm-http streams through the app against a scripted upstream: the upstream's own chunks reach the
client under ecobatch's id, model and tier, with what ecobatch does not interpret (logprobs) unchanged
and the usage only where the client asked for it; a client that leaves mid-stream closes the upstream
request (which vLLM's server aborts) and frees its slot."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from ecobatch.config import load_settings
from ecobatch.serving.app import create_app
from tests.integration.helpers import eventually, metric, sse_events


class Upstream:
    """A vLLM-like OpenAI server whose chat stream sends ``tokens`` chunks (one token each, with its
    logprobs), a usage chunk and ``[DONE]``; ``tokens=None`` streams until the client leaves, which it
    records."""

    def __init__(self, tokens: int | None) -> None:
        self.tokens = tokens
        self.client_left = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "up", "object": "model"}]})

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text="vllm:num_requests_running 0\n")

        async def chat(request: web.Request) -> web.StreamResponse:
            self.bodies.append(await request.json())
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                i = 0
                while self.tokens is None or i < self.tokens:
                    chunk = {
                        "id": "chatcmpl-upstream",
                        "object": "chat.completion.chunk",
                        "model": "up",
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": f"t{i} "},
                                "logprobs": {"content": [{"token": f"t{i}", "logprob": -0.5}]},
                                "finish_reason": None,
                            }
                        ],
                    }
                    await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    i += 1
                    await asyncio.sleep(0.005 if self.tokens is None else 0)
                usage = {"prompt_tokens": 3, "completion_tokens": i, "total_tokens": 3 + i}
                last = {"id": "chatcmpl-upstream", "choices": [], "usage": usage}
                await response.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
            except (ConnectionResetError, asyncio.CancelledError):
                self.client_left.set()
                raise
            return response

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/v1/chat/completions", chat)
        return app


async def proxy_in_front_of(upstream: Upstream, aiohttp_server: Any) -> TestServer:
    served = await aiohttp_server(upstream.app())
    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.upstream": str(served.make_url("")).rstrip("/"),
            "backend.served_model_name": "served",
            "energy.meter": "model",
        },
    )
    server: TestServer = await aiohttp_server(create_app(settings))
    return server


CHAT = {"messages": [{"role": "user", "content": "x"}], "stream": True, "logprobs": True}


async def test_the_upstream_chunks_reach_the_client_under_our_id_with_the_usage_only_when_asked(
    aiohttp_server: Any,
) -> None:
    upstream = Upstream(tokens=3)
    proxy = await proxy_in_front_of(upstream, aiohttp_server)
    url = str(proxy.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=CHAT) as resp:
            request_id = resp.headers["X-Ecobatch-Request-Id"]
            events = sse_events(await resp.text())
        async with session.post(url, json={**CHAT, "stream_options": {"include_usage": True}}) as resp:
            with_usage = sse_events(await resp.text())
    assert upstream.bodies[0]["stream_options"] == {"include_usage": True}, "forced: the ledger needs it"
    assert events[-1] == "[DONE]" and len(events) == 4
    chunks = events[:-1]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["t0 ", "t1 ", "t2 "]
    assert {c["id"] for c in chunks} == {request_id} and {c["model"] for c in chunks} == {"served"}
    assert {c["service_tier"] for c in chunks} == {"default"}
    assert chunks[1]["choices"][0]["logprobs"] == {"content": [{"token": "t1", "logprob": -0.5}]}
    assert all("usage" not in c for c in chunks)
    assert with_usage[-2]["usage"]["completion_tokens"] == 3 and with_usage[-2]["choices"] == []


async def test_a_client_that_leaves_mid_stream_closes_the_upstream_request_and_frees_its_slot(
    aiohttp_server: Any,
) -> None:
    upstream = Upstream(tokens=None)
    proxy = await proxy_in_front_of(upstream, aiohttp_server)
    async with aiohttp.ClientSession() as session:

        async def now(name: str, **labels: str) -> float:
            text = await (await session.get(str(proxy.make_url("/metrics")))).text()
            return metric(text, name, **labels)

        resp = await session.post(str(proxy.make_url("/v1/chat/completions")), json=CHAT)
        first = await resp.content.readuntil(b"\n\n")
        assert json.loads(first[len(b"data: ") :])["choices"][0]["delta"]["content"] == "t0 "
        resp.close()  # the client leaves mid-stream
        async with asyncio.timeout(10):  # a bound: the upstream streams until its client leaves
            await upstream.client_left.wait()

        async def settled() -> bool:
            left = await now("ecobatch_requests_total", status="499") == 1
            return left and await now("ecobatch_inflight_sequences") == 0

        await eventually(settled, "the request that left counted and its slot free")

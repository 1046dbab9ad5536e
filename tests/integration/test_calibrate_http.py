"""The vllm-http calibration loop against a scripted vLLM server: the concurrency it asks for is the
concurrency the server sees, past aiohttp's default pool of 100 connections."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ecobatch.energy.counters import NvmlCounters
from ecobatch.testing.servers import free_port
from ecobatch.tools.calibrate import calibrate_vllm_http
from tests.fakes import BurningGpu


class ScriptedVllm:
    """/v1/models, /metrics (generation_tokens_total) and /v1/completions that take 50 ms each."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.generated = 0

    def app(self) -> web.Application:
        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "scripted", "max_model_len": 4096}]})

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=f"vllm:generation_tokens_total {self.generated}.0\n")

        async def complete(request: web.Request) -> web.Response:
            body = await request.json()
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(0.05)
            finally:
                self.in_flight -= 1
            self.generated += body["max_tokens"]
            return web.json_response({"choices": [{"text": "x"}]})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/v1/completions", complete)
        return app


async def test_256_in_flight_reach_the_server_and_the_sweep_ends() -> None:
    upstream = ScriptedVllm()
    runner = web.AppRunner(upstream.app())
    await runner.setup()
    port = free_port()
    # a listen backlog like vLLM's server (uvicorn: 2048), not the test server's 128
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    try:
        points, facts = await asyncio.wait_for(
            calibrate_vllm_http(
                f"http://127.0.0.1:{port}",
                batch_sizes=[256],
                new_tokens=4,
                prompt_tokens=8,
                min_seconds=0.5,
                warmup_s=0.3,
                counters=NvmlCounters([BurningGpu(power_w=300.0)]),
                idle_power_w=100.0,
                progress=lambda line: None,
            ),
            timeout=30,
        )
    finally:
        await runner.cleanup()
    assert facts["served_model"] == "scripted"
    assert upstream.most_in_flight == 256
    assert points[0].size == 256 and points[0].generated_tokens > 0

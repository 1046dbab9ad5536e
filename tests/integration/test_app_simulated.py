"""The aiohttp app with the simulated backend: the proxy end to end, no GPU, no vLLM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ecobatch.config import load_settings
from ecobatch.serving.app import create_app
from tests.integration.helpers import eventually, metric, metric_of, sse_events

Client = TestClient[web.Request, web.Application]
ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> MakeClient:
    monkeypatch.setenv("ECOBATCH_ADMIN_KEYS", ADMIN_KEY)

    async def make(**overrides: object) -> Client:
        defaults: dict[str, object] = {"backend.sim_time_scale": 0.0}
        settings = load_settings(None, {**defaults, **overrides})
        client: Client = await aiohttp_client(create_app(settings))
        return client

    return make


async def settled_receipt(client: Client, request_id: str) -> dict[str, Any]:
    """The request's energy receipt once the meter has passed its end (a few 0.1 s intervals)."""
    for _ in range(100):
        receipt: dict[str, Any] = await (await client.get(f"/ecobatch/energy/{request_id}")).json()
        if receipt.get("status") == "settled":
            return receipt
        await asyncio.sleep(0.05)
    raise AssertionError(f"receipt for {request_id} never settled: {receipt}")


async def test_64_concurrent_requests_are_batched_and_each_gets_a_joule_observation(
    make_client: MakeClient,
) -> None:
    client = await make_client(**{"backend.sim_time_scale": 0.05})

    async def one(i: int) -> tuple[dict[str, Any], dict[str, str]]:
        resp = await client.post("/v1/completions", json={"prompt": f"request number {i}", "max_tokens": 8})
        assert resp.status == 200, await resp.text()
        return await resp.json(), dict(resp.headers)

    results = await asyncio.gather(*(one(i) for i in range(64)))
    receipts = [await settled_receipt(client, h["X-Ecobatch-Request-Id"]) for _, h in results]
    text = await (await client.get("/metrics")).text()
    batches = metric(text, "ecobatch_batch_size_count")
    assert metric(text, "ecobatch_batch_size_sum") == 64
    assert 64 / batches > 1, "requests were not batched"
    assert metric(text, "ecobatch_request_energy_joules_count", source="model") == 64
    assert metric(text, "ecobatch_requests_total", status="200") == 64
    completion = sum(body["usage"]["completion_tokens"] for body, _ in results)
    prompt = sum(body["usage"]["prompt_tokens"] for body, _ in results)
    assert completion == 64 * 8
    assert metric(text, "ecobatch_tokens_total", kind="completion") == completion
    assert metric(text, "ecobatch_tokens_total", kind="prompt") == prompt
    # the settled per-request joules add up to the exported energy counter, and are modelled
    energy_total = metric(text, "ecobatch_energy_joules_total", source="model")
    assert energy_total > 0
    assert sum(r["energy_joules"] for r in receipts) == pytest.approx(energy_total, rel=1e-9)
    assert {r["source"] for r in receipts} == {"model"}
    # the embedded static profile gives no idle power, so no power curve above idle: no marginal figure
    assert not any("marginal_energy_joules" in r for r in receipts)
    assert all(h["X-Ecobatch-Energy-Provisional-Basis"] == "profile (modelled)" for _, h in results)
    assert metric(text, "ecobatch_co2_grams_total") == pytest.approx(energy_total / 3.6e6 * 555.0)


async def test_chat_completion_has_the_openai_shape(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    )
    body = await resp.json()
    assert resp.status == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == "mistral-7b-int8-sim"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 5
    assert resp.headers["X-Ecobatch-Energy-Source"] == "model"
    assert resp.headers["X-Ecobatch-Request-Id"] == body["id"]
    assert float(resp.headers["X-Ecobatch-Energy-Provisional-Joules"]) > 0


async def test_a_list_prompt_gets_one_choice_per_prompt(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post(
        "/v1/completions", json={"prompt": ["one", "two words", "three more words"], "max_tokens": 3}
    )
    body = await resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}


async def test_stop_strings_end_generation(make_client: MakeClient) -> None:
    client = await make_client()
    full = await (
        await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 30, "seed": 7})
    ).json()
    words = full["choices"][0]["text"].split()
    stop = " " + words[3]
    cut = await (
        await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 30, "seed": 7, "stop": stop})
    ).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert stop not in cut["choices"][0]["text"]
    assert full["choices"][0]["text"].startswith(cut["choices"][0]["text"])


@pytest.mark.parametrize("include_usage", [True, False])
async def test_streaming_chat_sends_chunks_then_done(make_client: MakeClient, include_usage: bool) -> None:
    client = await make_client()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 4
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"]["completion_tokens"] == 4
    else:
        assert usage_chunks == []


async def test_streaming_completions_send_text_chunks(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert len(events) == 4


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 1}]}', "messages[0].content"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "temperature": -1}', "temperature"),
        ("/v1/completions", b"[1, 2, 3]", None),
        ("/v1/completions", b"\xff\xfe", None),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000000}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "seed": 1e400}', "seed"),  # valid JSON, past a float
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5000}',
            "max_completion_tokens",
        ),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    make_client: MakeClient, path: str, raw: bytes, param: str | None
) -> None:
    client = await make_client()
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    text = await (await client.get("/metrics")).text()
    assert metric(text, "ecobatch_requests_total", status="400") == 1
    assert metric(text, "ecobatch_batch_size_count") == 0, "a bad request must never join a batch"


async def test_unknown_model_is_404_and_unknown_route_is_a_json_error(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"  # a string, as in every error body
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_a_full_queue_answers_429_with_retry_after(make_client: MakeClient) -> None:
    client = await make_client(**{"backend.sim_time_scale": 1.0, "batching.max_queue": 1})
    body = {"prompt": "x", "max_tokens": 10}
    first = asyncio.ensure_future(client.post("/v1/completions", json=body))

    async def running() -> bool:  # the first is on the simulated GPU (~0.55 s)
        return await metric_of(client, "ecobatch_inflight_sequences") == 1

    await eventually(running, "the first request on the engine")
    second = asyncio.ensure_future(client.post("/v1/completions", json=body))

    async def queued() -> bool:
        return await metric_of(client, "ecobatch_queue_depth") == 1

    await eventually(queued, "the second request in the queue")
    third = await client.post("/v1/completions", json=body)
    assert third.status == 429
    assert int(third.headers["Retry-After"]) >= 1
    assert (await third.json())["error"]["type"] == "rate_limit_exceeded"
    assert (await first).status == 200
    assert (await second).status == 200


async def test_a_client_that_disconnects_leaves_its_batch(aiohttp_server: Any) -> None:
    import aiohttp

    settings = load_settings(None, {"backend.sim_time_scale": 1.0})
    server: TestServer = await aiohttp_server(create_app(settings))  # handler_cancellation=True, as in serve
    url = str(server.make_url("/v1/completions"))
    async with aiohttp.ClientSession() as session:

        async def now(name: str, **labels: str) -> float:
            text = await (await session.get(str(server.make_url("/metrics")))).text()
            return metric(text, name, **labels)

        async def running() -> bool:
            return await now("ecobatch_inflight_sequences") == 1

        busy = asyncio.ensure_future(session.post(url, json={"prompt": "x", "max_tokens": 10}))
        await eventually(running, "the first request on the engine")
        with pytest.raises(asyncio.TimeoutError):  # it waits behind the first, then its client leaves
            await session.post(
                url, json={"prompt": "leaves", "max_tokens": 10}, timeout=aiohttp.ClientTimeout(total=0.1)
            )
        assert (await busy).status == 200

        async def settled() -> bool:  # the one that left is counted, and nothing waits or runs
            left = await now("ecobatch_requests_total", status="499") == 1
            idle = await now("ecobatch_queue_depth") == 0 and await now("ecobatch_inflight_sequences") == 0
            return left and idle

        await eventually(settled, "the request that left counted and the engine idle")
        assert await now("ecobatch_requests_total", status="200") == 1
        assert await now("ecobatch_batch_size_sum") == 1, "the request that left was dispatched"


async def test_health_models_and_runtime_batching_settings(make_client: MakeClient) -> None:
    client = await make_client()
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok" and health["energy_source"] == "model"
    assert health["profile"] == {
        "name": "a800-mistral7b-int8-reference",
        "source": "reference",
        "kind": "static",
    }
    assert health["engine_shape"] == "static"
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["mistral-7b-int8-sim"]
    resp = await client.put(
        "/ecobatch/batching", json={"window_max_ms": 80, "max_batch_sequences": 8}, headers=ADMIN
    )
    assert resp.status == 200
    assert (await resp.json())["settings"]["max_batch_sequences"] == 8
    resp = await client.put("/ecobatch/batching", json={"window_max_ms": 1}, headers=ADMIN)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "batching.window_max_ms"
    current = await (await client.get("/ecobatch/batching", headers=ADMIN)).json()
    assert current["settings"]["window_max_ms"] == 80
    resp = await client.put("/ecobatch/batching", json={"interactive_budget_ms": 200}, headers=ADMIN)
    assert resp.status == 400, "a setting only continuous engines read is refused, not ignored"
    error = (await resp.json())["error"]
    assert error["param"] == "batching.interactive_budget_ms" and "this one is static" in error["message"]
    resp = await client.put("/ecobatch/batching", json=current["settings"], headers=ADMIN)
    assert resp.status == 200, "every setting as it stands can be put back (nothing changes)"


async def test_the_official_openai_client_works_unchanged(aiohttp_server: Any) -> None:
    import openai

    settings = load_settings(None, {"backend.sim_time_scale": 0.0})
    server: TestServer = await aiohttp_server(create_app(settings))
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0)
    model = (await client.models.list()).data[0].id
    chat = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens == 6
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(pieces).strip() and usage is not None and usage.completion_tokens == 5
    comp = await client.completions.create(model=model, prompt=["a", "b"], max_tokens=3)
    assert len(comp.choices) == 2
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert "temperature" in str(info.value)
    await client.close()


async def test_max_tokens_past_the_context_never_stalls_the_queue(make_client: MakeClient) -> None:
    """One absurd max_tokens used to hold the simulated GPU for minutes; now it is a 400 at once and
    its neighbours are served."""
    client = await make_client(**{"backend.sim_time_scale": 0.01})
    absurd = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100_000_000})
    fine = client.post("/v1/completions", json={"prompt": "y", "max_tokens": 4})
    bad_resp, ok_resp = await asyncio.gather(absurd, fine)
    assert bad_resp.status == 400 and ok_resp.status == 200
    error = (await bad_resp.json())["error"]
    assert error["param"] == "max_tokens" and "4096" in error["message"]


async def test_the_energy_receipt_settles_after_the_response(make_client: MakeClient) -> None:
    client = await make_client(**{"backend.sim_time_scale": 0.1})
    resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    request_id = resp.headers["X-Ecobatch-Request-Id"]
    receipt = await settled_receipt(client, request_id)
    assert receipt["source"] == "model" and receipt["energy_joules"] > 0
    assert receipt["completion_tokens"] == 3
    assert receipt["provisional_joules"] == pytest.approx(
        float(resp.headers["X-Ecobatch-Energy-Provisional-Joules"])
    )
    missing = await client.get("/ecobatch/energy/cmpl-nope")
    assert missing.status == 404 and "no energy receipt" in (await missing.json())["error"]["message"]


async def test_a_static_profile_in_front_of_a_continuous_engine_is_refused() -> None:
    from ecobatch.errors import ConfigError

    settings = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "energy.profile": "configs/profiles/a800-mistral7b-int8-reference.yaml",
        },
    )
    with pytest.raises(
        ConfigError, match=r"is a static profile, but backend.kind='vllm-http' is a continuous engine"
    ):
        create_app(settings)

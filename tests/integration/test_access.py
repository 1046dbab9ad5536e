"""Access control and request limits: API keys for the OpenAI routes, separate admin keys, keys never
logged, bodies over the limit refused in the OpenAI error form."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from ecobatch.config import load_settings
from ecobatch.serving.app import create_app

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def client_for(aiohttp_client: Any, **overrides: object) -> Any:
    settings = load_settings(None, {"backend.sim_time_scale": 0.0, **overrides})
    return await aiohttp_client(create_app(settings))


async def test_api_keys_guard_the_openai_routes_and_receipts(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-file-key-1\n\nsk-file-key-2\n")
    monkeypatch.setenv("ECOBATCH_API_KEYS", "sk-env-key")
    caplog.set_level(logging.DEBUG)
    client = await client_for(aiohttp_client, **{"server.api_keys_file": str(keys)})
    missing = await client.post("/v1/chat/completions", json=CHAT)
    assert missing.status == 401
    error = (await missing.json())["error"]
    assert error["code"] == "invalid_api_key" and "didn't provide an API key" in error["message"]
    wrong = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-nope"})
    assert wrong.status == 401 and (await wrong.json())["error"]["message"] == "Incorrect API key provided"
    for key in ("sk-file-key-1", "sk-file-key-2", "sk-env-key"):
        ok = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        assert ok.status == 200
    request_id = ok.headers["X-Ecobatch-Request-Id"]
    assert (await client.get(f"/ecobatch/energy/{request_id}")).status == 401
    assert (await client.get("/health")).status == 200, "probes need no key"
    assert (await client.get("/metrics")).status == 200, "scrapers need no key"
    assert not any(k in caplog.text for k in ("sk-file-key", "sk-env-key")), "a key was logged"


async def test_admin_routes_are_disabled_without_an_admin_key(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ECOBATCH_ADMIN_KEYS", raising=False)
    client = await client_for(aiohttp_client)
    resp = await client.put("/ecobatch/batching", json={"max_batch_sequences": 1})
    assert resp.status == 403
    assert "admin routes are disabled" in (await resp.json())["error"]["message"]
    assert (await client.get("/ecobatch/batching")).status == 403


async def test_admin_routes_need_the_admin_key_not_an_api_key(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ECOBATCH_API_KEYS", "sk-user")
    monkeypatch.setenv("ECOBATCH_ADMIN_KEYS", "sk-admin")
    client = await client_for(aiohttp_client)
    as_user = await client.put(
        "/ecobatch/batching", json={"max_batch_sequences": 4}, headers={"Authorization": "Bearer sk-user"}
    )
    assert as_user.status == 401
    as_admin = await client.put(
        "/ecobatch/batching", json={"max_batch_sequences": 4}, headers={"Authorization": "Bearer sk-admin"}
    )
    assert as_admin.status == 200 and (await as_admin.json())["settings"]["max_batch_sequences"] == 4


async def test_a_body_over_the_limit_is_a_413_in_the_openai_form(aiohttp_client: Any) -> None:
    client = await client_for(aiohttp_client, **{"server.max_body_bytes": 2048})
    big = {"prompt": "x" * 5000}
    resp = await client.post("/v1/completions", json=big)
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error" and "2048" in error["message"]
    assert error["code"] == "request_too_large"


async def test_metrics_can_move_to_their_own_port(aiohttp_client: Any) -> None:
    from aiohttp.test_utils import TestServer

    from ecobatch.serving.app import metrics_app

    settings = load_settings(None, {"backend.sim_time_scale": 0.0, "server.metrics_port": 0})
    app = create_app(settings)
    client = await aiohttp_client(app)
    assert (await client.get("/metrics")).status == 404
    metrics_client = await aiohttp_client(TestServer(metrics_app(app)))
    text = await (await metrics_client.get("/metrics")).text()
    assert "ecobatch_requests_total" in text

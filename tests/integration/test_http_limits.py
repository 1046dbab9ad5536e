"""Requests the HTTP parser refuses (a header line over ``server.max_header_bytes``) are answered like
every other error: a 4xx in the OpenAI form, without echoing what the client sent."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from ecobatch.app import create_app
from ecobatch.config import load_settings
from ecobatch.server import ApiRunner


@pytest.fixture
async def port() -> AsyncIterator[int]:
    settings = load_settings(None, {"backend.sim_time_scale": 0.0, "server.max_header_bytes": 2048})
    runner = ApiRunner(create_app(settings), max_header_bytes=settings.server.max_header_bytes)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    header_block, _, body = data.partition(b"\r\n\r\n")
    lines = header_block.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def test_a_header_over_the_limit_is_a_400_in_the_openai_form_naming_the_setting(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    secret = "sk-" + "s" * 4000
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()
    status, headers, body = await raw_request(port, head)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "header_too_large"
    assert "server.max_header_bytes=2048" in error["message"]
    assert "sss" not in body.decode()  # a too-long header may be a credential: never echoed
    assert "sss" not in caplog.text, "nor logged"
    assert "LineTooLong" in caplog.text


async def test_a_header_under_the_limit_is_served(port: int) -> None:
    body = b'{"prompt": "hi", "max_tokens": 2}'
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + "p" * 1500 + "\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    status, _, answer = await raw_request(port, head)
    assert status == 200, answer
    assert json.loads(answer)["usage"]["completion_tokens"] >= 1


async def test_a_malformed_request_line_is_a_400_in_the_openai_form(port: int) -> None:
    status, _, body = await raw_request(port, b"GET /health HTTP/1.1\r\nHost x\r\n\r\n")
    assert status == 400
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "bad_request"

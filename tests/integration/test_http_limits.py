"""Requests the HTTP parser refuses (a header line over ``server.max_header_bytes``) are answered like
every other error: a 4xx in the OpenAI form, without echoing what the client sent. aiohttp answers those
on the connection, outside the application: ``server.py`` replaces its connection handler through the
names checked in ``test_the_aiohttp_names_the_api_server_relies_on_are_still_there``."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator

import aiohttp.http
import aiohttp.http_exceptions
import pytest
from aiohttp import web

from ecobatch.config import load_settings
from ecobatch.serving.app import create_app
from ecobatch.serving.server import ApiRunner


@pytest.fixture
async def port() -> AsyncIterator[int]:
    settings = load_settings(None, {"backend.sim_time_scale": 0.0, "server.max_header_bytes": 2048})
    api = ApiRunner(create_app(settings), max_header_bytes=settings.server.max_header_bytes)
    runner = await api.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await api.cleanup()


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
    caplog.set_level(logging.DEBUG)
    secret = "sk-" + "s" * 4000
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()
    status, headers, body = await raw_request(port, head)
    assert status == 400
    assert headers["content-type"].startswith("application/json"), f"aiohttp answered on its own: {body!r}"
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


async def test_a_malformed_request_is_logged_by_its_kind_only(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, _, body = await raw_request(port, b"GET /health HTTP/1.1\r\nHost sk-zzzzzz\r\n\r\n")
    assert status == 400 and "zzz" not in body.decode()
    assert "zzz" not in caplog.text
    assert "refused a request from 127.0.0.1 that the HTTP parser could not read" in caplog.text


@pytest.fixture
async def failing_port() -> AsyncIterator[int]:
    """An application whose handlers fail past any middleware: aiohttp's connection handler answers."""

    async def times_out(_: web.Request) -> web.Response:
        raise TimeoutError

    async def fails(_: web.Request) -> web.Response:
        raise RuntimeError("sk-secret in a bug")

    app = web.Application()
    app.router.add_get("/times-out", times_out)
    app.router.add_get("/fails", fails)
    api = ApiRunner(app, max_header_bytes=2048)
    runner = await api.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1]
    await api.cleanup()


@pytest.mark.parametrize(
    ("path", "status", "message", "code"),
    [
        ("/times-out", 504, "the request timed out", "timeout"),
        ("/fails", 500, "internal error", "internal_error"),
    ],
)
async def test_a_handler_error_past_the_app_is_answered_in_the_openai_form(
    failing_port: int, path: str, status: int, message: str, code: str
) -> None:
    got, headers, body = await raw_request(failing_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert got == status
    assert headers["content-type"].startswith("application/json"), f"aiohttp answered on its own: {body!r}"
    assert json.loads(body) == {
        "error": {"message": message, "type": "internal_error", "param": None, "code": code}
    }


def test_the_aiohttp_names_the_api_server_relies_on_are_still_there() -> None:
    """No documented aiohttp hook changes the answer to a request its parser refused, so ``server.py``
    uses names aiohttp exports without documenting them as extension points. If this fails, aiohttp
    changed one: the OpenAI-form answers above (and the header not being logged) are at stake."""
    for name in ("RequestHandler", "Server", "ServerRunner", "AppRunner", "SockSite"):
        assert name in web.__all__, f"aiohttp.web no longer exports {name}"
    handle_error = inspect.signature(web.RequestHandler.handle_error)
    assert list(handle_error.parameters) == ["self", "request", "status", "exc", "message"], (
        f"aiohttp changed RequestHandler.handle_error{handle_error}: server.py overrides it"
    )
    handler_init = inspect.signature(web.RequestHandler.__init__).parameters
    assert {"manager", "loop", "max_line_size", "max_field_size"} <= set(handler_init), (
        f"aiohttp changed RequestHandler.__init__: {list(handler_init)}"
    )
    server_init = inspect.signature(web.Server.__init__).parameters
    assert {"handler", "request_factory", "handler_cancellation"} <= set(server_init), (
        f"aiohttp changed web.Server.__init__: {list(server_init)}"
    )
    assert "HttpProcessingError" in aiohttp.http.__all__
    assert issubclass(aiohttp.http_exceptions.LineTooLong, aiohttp.http.HttpProcessingError)


async def test_the_api_runner_cancels_the_handler_of_a_client_that_left() -> None:
    """``serve`` runs the API with ``handler_cancellation``: a client that leaves stops its request."""
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits(_: web.Request) -> web.Response:
        started.set_result(None)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set_result(None)
            raise
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/waits", waits)
    api = ApiRunner(app, max_header_bytes=2048, handler_cancellation=True)
    runner = await api.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET /waits HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(started, timeout=10)
        writer.close()
        await asyncio.wait_for(cancelled, timeout=10)
    finally:
        await api.cleanup()

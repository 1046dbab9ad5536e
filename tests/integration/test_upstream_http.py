"""Pooled connections to an upstream: a request that went out on an idle connection just as the server
closed it goes once more, on another connection, and only once; any other request the server drops is an
error, and one whose second try finds the server gone fails as the first try did (it may have run)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from ecobatch.engines import upstream_http

Drop = Callable[[int, int], bool]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Upstream:
    """A keep-alive HTTP server whose ``drop(connection_number, request_number_on_it)`` says which
    requests it closes the connection on instead of answering (as a server whose keep-alive timer
    fired as the request came)."""

    drop: Drop
    #: stop listening once a request is dropped (a server that died)
    gone_after_drop: bool = False
    server: asyncio.Server | None = None
    connections: int = 0
    requests: list[tuple[int, int]] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection, served = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                served += 1
                self.requests.append((connection, served))
                if self.drop(connection, served):
                    if self.gone_after_drop and self.server is not None:
                        self.server.close()
                    return
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


Serve = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(drop: Drop, gone_after_drop: bool = False) -> Upstream:
        upstream = Upstream(drop, gone_after_drop)
        server = upstream.server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        servers.append(server)
        upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"
        return upstream

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_a_request_on_an_idle_connection_the_server_closes_goes_again(serve: Serve) -> None:
    upstream = await serve(lambda connection, n: connection == 1 and n == 2)  # the 1st, when reused
    async with upstream_http.session() as http:
        for _ in range(2):
            async with await upstream_http.post(http, upstream.url, {"prompt": "hi"}) as r:
                assert r.status == 200
                await r.read()
    # the 2nd request: dropped on the pooled connection, then answered on a new one
    assert upstream.requests == [(1, 1), (1, 2), (2, 1)]


async def test_a_request_on_a_new_connection_the_server_drops_is_an_error_sent_once(serve: Serve) -> None:
    upstream = await serve(lambda connection, n: True)
    async with upstream_http.session() as http:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await upstream_http.post(http, upstream.url, {"prompt": "hi"})
    assert upstream.requests == [(1, 1)]


async def test_a_request_goes_again_only_once(serve: Serve) -> None:
    upstream = await serve(lambda connection, n: n > 1)  # answers each connection's first request only
    async with upstream_http.session() as http:

        async def one() -> None:
            async with await upstream_http.post(http, upstream.url, {}) as r:
                await r.read()

        await asyncio.gather(*(one() for _ in range(3)))  # three connections in the pool
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await one()  # dropped on a pooled connection, then on another pooled one: an error
    assert len(upstream.requests) == 3 + 2


async def test_a_second_try_that_finds_the_server_gone_fails_as_the_first_did(serve: Serve) -> None:
    """The server read the request and went away: it may have run it, so the caller must not take it
    for a request that never reached the server (a refused connection)."""
    upstream = await serve(lambda connection, n: n == 2, gone_after_drop=True)
    async with upstream_http.session() as http:
        async with await upstream_http.post(http, upstream.url, {}) as r:
            await r.read()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await upstream_http.post(http, upstream.url, {})
    assert upstream.requests == [(1, 1), (1, 2)]

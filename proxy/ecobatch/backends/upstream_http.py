"""HTTP to an upstream server (vLLM's OpenAI server) over pooled keep-alive connections.

A server closes a connection it has kept idle for a while (vLLM's server, uvicorn: after 5 s,
``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``). A request sent on a pooled connection at the moment the server closes
it gets no answer: the connection ends with no byte of a response (aiohttp: "Server disconnected").
Two things keep that from reaching a client of ecobatch:

* ``KEEPALIVE_S``: an idle connection is reused only within 2 s of its last response, by the client's
  clock. Not enough alone: the server's clock starts when it sent the response, the client's when it
  read it, and a client whose event loop lags by 3 s (seen: 2.7 s, a proxy sharing 2 cores with the
  engine) reuses a connection the server is closing.
* ``post``: a request that went out on a pooled connection and ended with no byte of an answer goes
  once more, on another connection. The server closed a connection it kept idle, so it never read the
  request: its keep-alive timer only runs while it waits for one. HTTP clients do the same for a
  server-closed idle connection (RFC 9112, 9.3.1; Go's net/http). A request on a new connection that
  ends that way is an error, never sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp

__all__ = ["KEEPALIVE_S", "post", "session"]

log = logging.getLogger(__name__)

#: how long an idle upstream connection is kept for reuse: below the 5 s after which vLLM's server closes it
KEEPALIVE_S = 2.0


async def _mark_reused(_session: aiohttp.ClientSession, context: SimpleNamespace, _params: Any) -> None:
    if isinstance(context.trace_request_ctx, dict):
        context.trace_request_ctx["reused"] = True


def session(
    *, timeout: aiohttp.ClientTimeout | None = None, headers: Mapping[str, str] | None = None
) -> aiohttp.ClientSession:
    """A session for load on an upstream: no limit on connections (aiohttp's default pool of 100 would
    cap the requests in flight), idle ones kept ``KEEPALIVE_S``, each request told whether its
    connection came from the pool (what ``post`` needs)."""
    tracer = aiohttp.TraceConfig()
    tracer.on_connection_reuseconn.append(_mark_reused)
    return aiohttp.ClientSession(
        timeout=timeout or aiohttp.ClientTimeout(total=None),
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
        headers=headers,
        trace_configs=[tracer],
    )


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> aiohttp.ClientResponse:
    """POST ``body`` as JSON on a ``session``; the response once its status line and headers are in (use
    it in ``async with``). Sent again, on another connection, while it went out on a pooled connection
    that the server closed with no byte of an answer (each such try takes one idle connection out of the
    pool: the tries end with the pool)."""
    while True:
        seen = {"reused": False}
        try:
            return await http.post(url, json=body, trace_request_ctx=seen)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not seen["reused"] or isinstance(exc, aiohttp.ClientConnectorError):
                raise
            log.debug("%s closed an idle connection as a request went out on it: sent again", url)

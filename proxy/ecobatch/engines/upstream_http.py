"""HTTP to an upstream vLLM server over pooled keep-alive connections.

A server closes a connection it has kept idle for a while (vLLM's server, uvicorn: after
``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, 5 s by default). A request sent on a pooled connection at the moment
the server closes it gets no answer: the connection ends with no byte of a response (aiohttp: "Server
disconnected"), and the client sees a 502. Three things keep that from reaching ecobatch's clients:

* start vLLM with ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE=75`` (the deploy files do): it keeps idle connections
  far longer than ecobatch reuses them;
* ``KEEPALIVE_S``: ecobatch reuses an idle connection only within 2 s of its last response, by its own
  clock. Not enough alone against vLLM's 5 s: the server's clock starts when it sent the response,
  ecobatch's when it read it, and a proxy whose event loop stalls for 3 s (one sharing its cores with
  the engine, not scheduled at all meanwhile) reuses a connection the server is closing;
* ``post``: a request that went out on a pooled connection and ended with no byte of an answer goes
  once more, on another connection, and only once. That is the keep-alive race above (the server closed
  the connection before reading the request) or a server that read it and then dropped the connection
  (its process died): then vLLM may have started the request, and it can run twice. If the second try
  cannot connect, the first failure is raised (the request may have reached the engine: it must not be
  sent to another replica as one that never did).
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
    it in ``async with``). Sent a second time, and at most that, where it went out on a pooled
    connection that the server closed with no byte of an answer."""
    seen = {"reused": False}
    try:
        return await http.post(url, json=body, trace_request_ctx=seen)
    except aiohttp.ServerDisconnectedError as first:
        if not seen["reused"]:
            raise
        log.info("%s closed a pooled connection with no answer as a request went out on it: sent again", url)
        try:
            return await http.post(url, json=body)
        except aiohttp.ClientConnectorError:  # the server is gone: it may have taken the first try
            raise first from None

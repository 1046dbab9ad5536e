"""Running the proxy as a process: listen first, bring the engine up, drain on SIGTERM, exit.

1. The app is built (a bad setting stops here: exit code 2) and its ports are bound (a port in use stops
   here: exit code 2, before the engine starts and before anything is logged as listening or ready);
   then the server **listens**, and ``/health`` answers 503 with the reason until the engine is ready.
2. The runtime brings the engine up in the background, logging what it waits for every few seconds;
   if it is not ready within ``backend.startup_timeout_s``: one line, exit code 1. Once it is up, the
   garbage collector is set for serving (``collect_for_serving``).
3. On SIGTERM or SIGINT: **drain**. The socket stays open and new requests get 503 with
   ``Retry-After``; queued and in-flight requests get ``server.shutdown_grace_s`` to finish, the rest are
   answered 503. Then the meter and the engine close. The process is gone within grace + 4 s whatever
   hangs (``EXIT_AFTER_GRACE_S``: ``_DRAIN_EXTRA_S`` past the grace for the drain to end, ``_CLEANUP_S``
   for the engine and the meter to close, then ``WORKERS_WAIT_S`` for the worker threads; the caller,
   ``cli``, exits hard when ``stuck`` comes back true or a worker thread is still busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.http_exceptions import LineTooLong

from ..config import Settings
from ..errors import ConfigError
from .app import BRING_UP, RUNTIME, create_app, metrics_app

__all__ = [
    "EXIT_AFTER_GRACE_S",
    "GC_YOUNG_THRESHOLD",
    "WORKERS_WAIT_S",
    "ApiRunner",
    "Exit",
    "StartupError",
    "collect_for_serving",
    "serve",
]

log = logging.getLogger(__name__)
_CLEANUP_S = 2.0
_DRAIN_EXTRA_S = 1.0
#: once ``serve`` has returned, how long the caller waits for its worker threads before leaving without them
WORKERS_WAIT_S = 1.0
#: after SIGTERM the process is gone within server.shutdown_grace_s plus this, even with a stuck engine
EXIT_AFTER_GRACE_S = _DRAIN_EXTRA_S + _CLEANUP_S + WORKERS_WAIT_S

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
RequestFactory = Callable[..., web.BaseRequest]


class StartupError(Exception):
    """A start-up failure the user can fix; its message is one line saying how."""


@dataclass(frozen=True, slots=True)
class Exit:
    code: int
    #: the engine or the meter did not stop in time: the process must exit hard
    stuck: bool = False


# How the API's parser errors reach the OpenAI form, through aiohttp's public names only.
#
# A request the HTTP parser refuses never reaches the application (no middleware, no signal sees it):
# aiohttp answers it on the connection, by calling ``RequestHandler.handle_error(request, 400, exc)``
# with the parser's exception. No documented hook changes that answer, so the connection handler is
# replaced, using only names aiohttp exports without an underscore (checked from 3.8 to 3.14):
# ``web.RequestHandler`` (exported in ``web.__all__``) with its ``handle_error`` overridden;
# ``web.Server`` (documented as the protocol factory for ``loop.create_server``) whose ``__call__``
# makes that handler; ``web.ServerRunner`` to serve it; the application's own handler and request
# factory read from the ``web.AppRunner``'s server (``request_handler``, ``request_factory``); the
# exception classes from ``aiohttp.http`` and ``aiohttp.http_exceptions``. None of this is documented
# as an extension point, so tests/integration/test_http_limits.py checks each name and signature, and
# the answers themselves: an aiohttp that changes them fails there, loudly.


def _parser_refusal(exc: BaseException, max_header_bytes: int) -> tuple[str, str]:
    """The OpenAI error (message, code) for a request the HTTP parser refused. Never the parser's own
    message: it quotes the refused bytes, and a header that is too long may be a credential."""
    if isinstance(exc, LineTooLong):
        message = (
            "a request header line (or the request line) is longer than "
            f"server.max_header_bytes={max_header_bytes} bytes"
        )
        return message, "header_too_large"
    return f"malformed HTTP request ({type(exc).__name__})", "bad_request"


class _OpenAIErrorsHandler(web.RequestHandler):
    """aiohttp's connection handler, whose own error answers (a request the HTTP parser refused: a
    header line over ``max_field_size``, a malformed request line; a handler's error or time-out that
    escaped the app) leave in the OpenAI error form like every other error, instead of aiohttp's plain
    text. They never echo nor log what the client sent."""

    def __init__(
        self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, max_header_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self.max_header_bytes = max_header_bytes

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # a handler's error (504: its time-out)
            default = super().handle_error(request, status, exc, message)  # logs it; refuses a 2nd answer
            if default.status == 504:
                return _error(504, "the request timed out", "internal_error", "timeout")
            return _error(default.status, "internal error", "internal_error", "internal_error")
        # logged without aiohttp's message: it quotes the refused bytes, which may be a credential
        log.info(
            "refused a request from %s that the HTTP parser could not read: %s",
            request.remote,
            type(exc).__name__,
        )
        text, code = _parser_refusal(exc, self.max_header_bytes)
        return _error(status, text, "invalid_request_error", code)


def _error(status: int, message: str, error_type: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    response = web.json_response(body, status=status)
    response.force_close()
    return response


class _OpenAIErrorsServer(web.Server):
    """aiohttp's low-level server (the protocol factory) whose connections are ``_OpenAIErrorsHandler``s
    with the API's header limit."""

    def __init__(
        self,
        handler: Handler,
        *,
        request_factory: RequestFactory,
        handler_cancellation: bool,
        max_header_bytes: int,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            max_line_size=max_header_bytes,
            max_field_size=max_header_bytes,
        )
        self.max_header_bytes = max_header_bytes
        self.event_loop = asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        limit = self.max_header_bytes
        return _OpenAIErrorsHandler(
            self, loop=self.event_loop, max_header_bytes=limit, max_line_size=limit, max_field_size=limit
        )


class ApiRunner:
    """The API application served with the API's header limit, its parser errors answered in the
    OpenAI form.

    A ``web.AppRunner`` runs the application's life (``setup``: its startup; ``cleanup``: its
    shutdown and cleanup); its server gives the application's handler and request factory, which an
    ``_OpenAIErrorsServer`` serves through a ``web.ServerRunner``: ``setup`` returns that runner, for
    the sites."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_header_bytes: int,
        handler_cancellation: bool = False,
        shutdown_timeout: float = 60.0,
    ) -> None:
        self.app_runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
        self.max_header_bytes = max_header_bytes
        self.handler_cancellation = handler_cancellation
        self.shutdown_timeout = shutdown_timeout
        self.runner: web.ServerRunner | None = None

    async def setup(self) -> web.ServerRunner:
        await self.app_runner.setup()
        app_server = self.app_runner.server
        assert app_server is not None  # set by setup
        server = _OpenAIErrorsServer(
            app_server.request_handler,
            request_factory=app_server.request_factory,
            handler_cancellation=self.handler_cancellation,
            max_header_bytes=self.max_header_bytes,
        )
        self.runner = web.ServerRunner(server, shutdown_timeout=self.shutdown_timeout)
        await self.runner.setup()
        return self.runner

    async def cleanup(self) -> None:
        """Stop listening and close the connections (in-flight ones get ``shutdown_timeout``), then the
        application's shutdown and cleanup."""
        if self.runner is not None:
            await self.runner.cleanup()
        await self.app_runner.cleanup()


# Pending connections the kernel queues before accept (capped by net.core.somaxconn): a burst of
# clients opening connections at once must not overflow it (a dropped SYN is retried after ~1 s).
LISTEN_BACKLOG = 1024


def _bind(host: str, port: int, what: str) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as ``web.TCPSite`` would bind them),
    made before anything else starts: a port in use stops the start here."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sockets.append(socket.create_server(address, family=family, backlog=LISTEN_BACKLOG))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        where = f"cannot listen on {host}:{port} for {what}"
        if isinstance(exc, socket.gaierror):
            raise StartupError(f"{where}: server.host={host!r} cannot be resolved ({exc.strerror})") from None
        raise StartupError(
            f"{where}: {os.strerror(exc.errno) if exc.errno else exc}; is another process using it? "
            "choose another port (--port / server.port / server.metrics_port)"
        ) from None
    return sockets


#: allocations between two collections of the youngest generation while serving (CPython's default: 700)
GC_YOUNG_THRESHOLD = 10_000


def collect_for_serving() -> None:
    """Set CPython's cyclic garbage collector for serving, once start-up is over.

    Requests make many short-lived containers and almost no reference cycles (reference counting frees
    them), yet at the default threshold the collector runs every 700 allocations, each time walking the
    requests in flight and, now and then, every object start-up made (modules, the engine, the
    profile), for almost nothing collected (its share of the CPU under load: docs/measured.md). So what
    start-up made is collected once and moved out of the collector's sight (``gc.freeze``), and the
    youngest generation is collected every ``GC_YOUNG_THRESHOLD`` allocations; cycles made while serving
    are still collected, a little later. Cycles among what start-up made are not: a replica present at
    start-up that later leaves (a replicas file or DNS source) keeps its objects that sit in cycles, once.
    ``create_app`` alone (tests, embedding) leaves the collector as it is.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def _when_up(bring_up: asyncio.Task[None]) -> None:
    if not bring_up.cancelled() and bring_up.exception() is None:
        collect_for_serving()


async def serve(settings: Settings) -> Exit:
    server = settings.server
    app = create_app(settings, start_in_background=True)
    # The ports are bound before the app starts: a port in use stops here, before the engine is started
    # and before anything says it listens.
    api_sockets = _bind(server.host, server.port, "the API")
    metrics_sockets: list[socket.socket] = []
    if server.metrics_port is not None:
        try:
            metrics_sockets = _bind(server.host, server.metrics_port, "/metrics")
        except StartupError:
            for sock in api_sockets:
                sock.close()
            raise
    api = ApiRunner(
        app, handler_cancellation=True, shutdown_timeout=1.0, max_header_bytes=server.max_header_bytes
    )
    serving = await api.setup()  # the app starts: the engine comes up in the background
    app[BRING_UP].add_done_callback(_when_up)
    sites = [web.SockSite(serving, sock, backlog=LISTEN_BACKLOG) for sock in api_sockets]
    metrics: web.AppRunner | None = None
    if metrics_sockets:
        metrics = web.AppRunner(metrics_app(app), shutdown_timeout=1.0)
        await metrics.setup()
        sites += [web.SockSite(metrics, sock, backlog=LISTEN_BACKLOG) for sock in metrics_sockets]
    for site in sites:
        await site.start()
    runtime = app[RUNTIME]
    log.info(
        "listening on http://%s:%d (backend=%s); /health answers 503 until the engine is ready",
        server.host,
        server.port,
        settings.backend.kind,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = await _until_stopped(app[BRING_UP], stop)
    if code:
        log.error("ecobatch could not start: %s", runtime.reason)
    stuck = False
    grace = server.shutdown_grace_s
    try:
        await asyncio.wait_for(runtime.drain(grace), timeout=grace + _DRAIN_EXTRA_S)
    except TimeoutError:
        log.error("the drain did not end within the grace (%.0f s): stopping anyway", grace)
        stuck = True
    try:
        async with asyncio.timeout(_CLEANUP_S):
            if metrics is not None:
                await metrics.cleanup()
            await api.cleanup()
    except TimeoutError:
        log.error("the engine or the meter did not close within %.0f s: exiting anyway", _CLEANUP_S)
        stuck = True
    log.info("stopped")
    return Exit(code, stuck)


async def _until_stopped(bring_up: asyncio.Task[None], stop: asyncio.Event) -> int:
    """0 after a stop signal; 1 if the engine failed to come up first, 2 if a setting was wrong."""
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({bring_up, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if bring_up.done() and not bring_up.cancelled() and bring_up.exception() is not None:
            return 2 if isinstance(bring_up.exception(), ConfigError) else 1
        await stop.wait()
        log.info("stop signal received")
        return 0
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper

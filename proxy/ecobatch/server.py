"""Running the proxy as a process: listen first, bring the engine up, drain on SIGTERM, exit.

1. The app is built (a bad setting stops here: exit code 2) and the server **listens** (a port in use
   stops here: exit code 2); ``/health`` answers 503 with the reason until the engine is ready.
2. The runtime brings the engine up in the background, logging what it waits for every few seconds;
   if it is not ready within ``backend.startup_timeout_s``: one line, exit code 1.
3. On SIGTERM or SIGINT: **drain**. The socket stays open and new requests get 503 with
   ``Retry-After``; queued and in-flight requests get ``server.shutdown_grace_s`` to finish, the rest are
   answered 503. Then the meter and the engine close. The process is gone within grace + 3 s even if
   the engine is stuck (``_DRAIN_EXTRA_S`` past the grace for the drain to end, ``_CLEANUP_S`` for the
   engine and the meter to close; the caller exits hard when ``stuck`` comes back true).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .app import BRING_UP, RUNTIME, create_app, metrics_app
from .config import Settings
from .errors import ConfigError

__all__ = ["EXIT_AFTER_GRACE_S", "ApiRunner", "Exit", "StartupError", "serve"]

log = logging.getLogger(__name__)
_CLEANUP_S = 2.0
_DRAIN_EXTRA_S = 1.0
#: after SIGTERM the process is gone within server.shutdown_grace_s plus this, even with a stuck engine
EXIT_AFTER_GRACE_S = _DRAIN_EXTRA_S + _CLEANUP_S


class StartupError(Exception):
    """A start-up failure the user can fix; its message is one line saying how."""


@dataclass(frozen=True, slots=True)
class Exit:
    code: int
    #: the engine or the meter did not stop in time: the process must exit hard
    stuck: bool = False


class _OpenAIErrorsHandler(RequestHandler):
    """aiohttp's connection handler, whose own error answers (a request the HTTP parser refused: a
    header line over ``max_field_size``, a malformed request line) leave in the OpenAI error form like
    every other error, instead of aiohttp's plain text. They never echo what the client sent: a header
    that is too long may be a credential."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, BadHttpMessage):  # a handler's error (504: its time-out): aiohttp's answer
            default = super().handle_error(request, status, exc, message)
            what = "the request timed out" if status == 504 else "internal error"
            return _error(
                default.status, what, "internal_error", "timeout" if status == 504 else "internal_error"
            )
        if request.writer.output_size > 0:
            raise ConnectionError("response already sent, cannot send another one")
        # logged without aiohttp's message: it quotes the refused bytes, which may be a credential
        log.info(
            "refused a request from %s that the HTTP parser could not read: %s",
            request.remote,
            type(exc).__name__,
        )
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else "?"
            text = (
                "a request header line (or the request line) is longer than "
                f"server.max_header_bytes={limit} bytes"
            )
            return _error(status, text, "invalid_request_error", "header_too_large")
        return _error(
            status, f"malformed HTTP request ({type(exc).__name__})", "invalid_request_error", "bad_request"
        )


def _error(status: int, message: str, error_type: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    response = web.json_response(body, status=status)
    response.force_close()
    return response


class _OpenAIErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _OpenAIErrorsHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """An ``AppRunner`` with the API's header limit whose parser errors answer in the OpenAI form."""

    def __init__(self, app: web.Application, *, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(app, max_line_size=max_header_bytes, max_field_size=max_header_bytes, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _OpenAIErrorsServer  # the same server; only its connections' handler differs
        return server


# Pending connections the kernel queues before accept (capped by net.core.somaxconn): a burst of
# clients opening connections at once must not overflow it (a dropped SYN is retried after ~1 s).
LISTEN_BACKLOG = 1024


async def _listen(runner: web.AppRunner, host: str, port: int, what: str) -> None:
    try:
        await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}; is another process using it? "
            "choose another port (--port / server.port / server.metrics_port)"
        ) from None


async def serve(settings: Settings) -> Exit:
    server = settings.server
    app = create_app(settings, start_in_background=True)
    runners: list[web.AppRunner] = [
        ApiRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, max_header_bytes=server.max_header_bytes
        )
    ]
    if server.metrics_port is not None:
        runners.append(web.AppRunner(metrics_app(app), shutdown_timeout=1.0))
    for runner in runners:
        await runner.setup()
    try:
        await _listen(runners[0], server.host, server.port, "the API")
        if server.metrics_port is not None:
            await _listen(runners[1], server.host, server.metrics_port, "/metrics")
    except StartupError:
        for runner in runners:
            await runner.cleanup()
        raise
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
            for runner in reversed(runners):
                await runner.cleanup()
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

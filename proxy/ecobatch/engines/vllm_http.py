"""A remote vLLM OpenAI server as a continuous engine: one upstream request per client request.

* Each request goes upstream on its own, as soon as the gate releases it, with the client's body
  (model name swapped for the upstream's); vLLM batches whatever is in flight. Responses and chunks
  carry ecobatch's request id (the one its energy receipt is filed under) and the served model name.
* ``generate`` yields one ``EngineOutput`` per upstream chunk as it comes (a non-streamed request: one,
  with the whole response), each with the choices' text deltas and keeping the upstream's own JSON, so
  that the HTTP layer passes it through (logprobs, tool calls and vLLM's extensions reach the client
  unchanged). ``stream_options.include_usage`` is forced upstream to learn the engine's usage; the HTTP
  layer drops the usage again where the client did not ask for it. Each chunk that carries text counts
  as one generated token for the energy ledger (vLLM sends one chunk per token); the final usage
  rescales the count. The next chunk is read only when the previous output has been taken: a slow
  client slows the upstream response (TCP backpressure; vLLM merges the outputs it cannot send yet).
* Closing the generator (the client left, a time-out) closes its upstream connection, and vLLM's
  server aborts a request whose client disconnected.
* Connections are pooled (``upstream_http``): a request that went out on an idle connection just as
  vLLM closed it goes once more on another.
* Upstream errors: 4xx keep their status and message; 5xx, broken connections and malformed replies
  become 502 ``BackendFailed``; the gate's time-out becomes 504.
* ``prepare`` refuses a ``max_tokens`` that cannot fit the upstream's ``max_model_len`` (from its
  /v1/models) before queuing; the exact prompt length is vLLM's to check (its 400 passes through).
* A background task polls the upstream's /metrics for KV headroom (see ``vllm_metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from typing import Any, ClassVar

import aiohttp
from prometheus_client import CollectorRegistry

from ..config import BackendSettings
from ..domain import EngineOutput, GenerationRequest, Headroom, TextDelta, Usage
from ..errors import BackendFailed, BadRequest, EcobatchError
from ..fields import check_fields
from . import upstream_http
from .base import EngineHealth, EngineShape, Progress
from .breaker import Breaker
from .limits import check_max_tokens
from .vllm_metrics import headroom_from_metrics

__all__ = ["VllmHttpBackend"]

log = logging.getLogger(__name__)


def _usage(raw: Mapping[str, Any] | None) -> Usage:
    if not raw:
        raise BackendFailed("the upstream response carried no usage")
    try:
        usage = Usage(int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0)))
    except (TypeError, ValueError) as exc:
        raise BackendFailed(f"the upstream usage is malformed: {raw!r}") from exc
    if usage.prompt_tokens < 0 or usage.completion_tokens < 0:
        raise BackendFailed(f"the upstream usage is negative: {raw!r}")
    return usage


def _upstream_error(status: int, text: str) -> EcobatchError:
    message, param = text[:2000], None
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message", message))
            param = err.get("param") if isinstance(err.get("param"), str) else None
    except json.JSONDecodeError:
        pass
    if 400 <= status < 500:
        return BadRequest(f"upstream: {message}", param=param, status=status)
    failed = BackendFailed(f"upstream returned {status}: {message}")
    failed.upstream_status = status
    return failed


def _why(exc: BaseException) -> str:
    """A short reason for a failed upstream call ("connection refused", "HTTP 503")."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host name ({cause.strerror})"
    return str(exc) or type(exc).__name__


def _deltas(payload: Mapping[str, Any]) -> tuple[TextDelta, ...]:
    """Each choice's text and finish reason in an upstream response or stream chunk (chat: the message's
    or the delta's content; completions: the text)."""
    deltas = []
    for choice in payload.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        message = choice.get("delta", choice.get("message"))
        text = message.get("content") if isinstance(message, Mapping) else choice.get("text")
        index, finish_reason = choice.get("index", 0), choice.get("finish_reason")
        deltas.append(
            TextDelta(
                index if isinstance(index, int) else 0,
                text if isinstance(text, str) else "",
                finish_reason if isinstance(finish_reason, str) else None,
            )
        )
    return tuple(deltas)


class VllmHttpBackend:
    name = "vllm-http"
    shape: ClassVar[EngineShape] = "continuous"
    metrics_registry: CollectorRegistry | None = None

    def __init__(self, settings: BackendSettings) -> None:
        self._settings = settings
        self._base = settings.upstream.rstrip("/")
        self._upstream_model = settings.model
        self._served = settings.served_model_name
        self._session: aiohttp.ClientSession | None = None
        self._headroom = Headroom()
        self._poller: asyncio.Task[None] | None = None
        self.context_tokens: int | None = None
        self.breaker = Breaker(self._base, settings.breaker_failures)
        self.started = False  # the upstream has answered /v1/models once

    @property
    def upstream(self) -> str:
        return self._base

    @property
    def upstream_model(self) -> str | None:
        """The upstream's model name (asked from /v1/models where backend.model is not set)."""
        return self._upstream_model

    def require_model(self, model: str | None) -> None:
        """Serve ``model`` (another replica's): an upstream that does not serve it is refused at start."""
        if self._upstream_model is None:
            self._upstream_model = model

    @property
    def model(self) -> str:
        return self._served or self._upstream_model or "unknown"

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self, progress: Progress) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout_s)
        self._session = upstream_http.session(timeout=timeout)
        await self._wait_for_upstream(progress)
        self._poller = asyncio.create_task(self._watch(), name="vllm-watch")
        self.started = True

    async def _wait_for_upstream(self, progress: Progress) -> None:
        """Ask /v1/models until the upstream answers (the runtime bounds how long)."""
        started = asyncio.get_running_loop().time()
        while True:
            try:
                async with self._http.get(f"{self._base}/v1/models") as resp:
                    resp.raise_for_status()
                    models = (await resp.json())["data"]
                ids = [m["id"] for m in models]
                if self._upstream_model is None:
                    self._upstream_model = ids[0]
                elif self._upstream_model not in ids:
                    raise BackendFailed(
                        f"backend.model={self._upstream_model!r} is not served upstream; it serves {ids}"
                    )
                mine = next(m for m in models if m["id"] == self._upstream_model)
                if isinstance(mine.get("max_model_len"), int):
                    self.context_tokens = mine["max_model_len"]
                return
            except BackendFailed:
                raise
            except (aiohttp.ClientError, OSError, KeyError, IndexError, ValueError, TypeError) as exc:
                waited = asyncio.get_running_loop().time() - started
                progress(f"waiting for upstream {self._base}: {_why(exc)} ({waited:.0f} s)")
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._session is not None:
            await self._session.close()

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BackendFailed("vllm-http backend used before start()")
        return self._session

    def headroom(self) -> Headroom:
        return self._headroom

    def health(self) -> EngineHealth:
        state = self.breaker.state()
        return state if self.started else dataclasses.replace(state, state="starting")

    async def _watch(self) -> None:
        """Read the upstream's /metrics every ``headroom_poll_s``: KV headroom, and a health probe that
        opens the breaker when the upstream stops answering and closes it when it answers again."""
        probe = aiohttp.ClientTimeout(total=self._settings.probe_timeout_s)
        while True:
            try:
                asked_s = time.monotonic()
                async with self._http.get(f"{self._base}/metrics", timeout=probe) as resp:
                    resp.raise_for_status()
                    read = headroom_from_metrics(await resp.text())
                    self._headroom = dataclasses.replace(read, read_at_s=asked_s)
                self.breaker.success()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                self.breaker.failure(f"health probe: {_why(exc)}")
            except Exception as exc:  # the probe must outlive any surprise: only it closes the breaker
                log.exception("health probe of %s failed", self._base)
                self.breaker.failure(f"health probe: {type(exc).__name__}")
            await asyncio.sleep(self._settings.headroom_poll_s)

    # ---- generation ----------------------------------------------------------------------------
    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        self.breaker.check()  # the upstream is down: 503 now, not after a queue and a time-out
        check_fields(request, None, self.name, allow_unknown=self._settings.pass_unknown_fields)
        if self.context_tokens is not None:
            check_max_tokens(request, self.context_tokens)  # vLLM checks the prompt's exact length
        return request

    def _upstream_body(self, request: GenerationRequest) -> dict[str, Any]:
        body = dict(request.body)
        body["model"] = self._upstream_model
        return body

    @staticmethod
    def _path(request: GenerationRequest) -> str:
        return "/v1/chat/completions" if request.kind == "chat" else "/v1/completions"

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineOutput, None]:
        self.breaker.check()
        try:
            if request.stream:
                async with contextlib.aclosing(self._stream(request)) as outputs:
                    async for output in outputs:
                        yield output
            else:
                yield await self._post(request)
        except (aiohttp.ClientError, OSError) as exc:
            failed = BackendFailed(f"upstream {self._base} failed: {_why(exc)}")
            # no connection was made: the request never reached the engine (safe to send elsewhere)
            failed.connect_failed = isinstance(
                exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
            )
            refused = isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                exc.os_error, ConnectionRefusedError
            )
            if refused:  # nothing listens there: down now, not after breaker_failures requests
                self.breaker.trip(_why(exc))
            else:
                self.breaker.failure(_why(exc))
            raise failed from exc
        except BackendFailed as exc:
            if exc.upstream_status is None or exc.upstream_status >= 500:
                self.breaker.failure(exc.message)
            raise
        self.breaker.success()

    async def _post(self, request: GenerationRequest) -> EngineOutput:
        url = f"{self._base}{self._path(request)}"
        async with await upstream_http.post(self._http, url, self._upstream_body(request)) as r:
            text = await r.text()
            if r.status != 200:
                raise _upstream_error(r.status, text)
        data = _json_object(text, "answered with")
        return EngineOutput(_deltas(data), usage=_usage(data.get("usage")), upstream=data)

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[EngineOutput, None]:
        body = self._upstream_body(request)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        url = f"{self._base}{self._path(request)}"
        async with await upstream_http.post(self._http, url, body) as resp:
            if resp.status != 200:
                raise _upstream_error(resp.status, await resp.text())
            async with contextlib.aclosing(_relay(resp.content)) as outputs:
                async for output in outputs:
                    yield output


def _json_object(raw: str | bytes, what: str) -> dict[str, Any]:
    """The upstream's JSON object; a ``BackendFailed`` saying what it ``what`` instead."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BackendFailed(f"the upstream {what} malformed JSON: {raw[:200]!r}") from exc
    if not isinstance(data, dict):
        raise BackendFailed(f"the upstream {what} a non-object: {raw[:200]!r}")
    return data


async def _relay(lines: AsyncIterable[bytes]) -> AsyncGenerator[EngineOutput, None]:
    """An upstream SSE stream's chunks as they come, each one an output that keeps the chunk; the one
    with the usage carries it. A stream that ends before ``[DONE]``, or without usage, or with a
    malformed chunk, is a ``BackendFailed``."""
    usage_seen = False
    async for raw_line in lines:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            if not usage_seen:
                raise BackendFailed("the upstream stream ended without a usage chunk")
            return
        chunk = _json_object(payload, "stream sent")
        if "error" in chunk:
            raise _upstream_error(502, json.dumps(chunk))
        deltas = _deltas(chunk)
        usage = _usage(chunk["usage"]) if chunk.get("usage") else None
        usage_seen = usage_seen or usage is not None
        yield EngineOutput(deltas, sum(1 for d in deltas if d.text), usage, upstream=chunk)
    raise BackendFailed("the upstream stream ended before [DONE]")

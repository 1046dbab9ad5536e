"""A remote vLLM OpenAI server as the engine.

* Non-streaming completions whose bodies agree on everything but ``prompt`` go upstream as one
  list-prompt request (with ``return_token_ids`` so each request's usage is the engine's own count).
  If the merged request is refused with a 4xx, its requests are retried one by one, so one bad input
  fails alone.
* Chat requests and streams go upstream one each, concurrently; streams are passed through chunk by
  chunk (``stream_options.include_usage`` is forced upstream to learn the usage, and the usage chunk is
  dropped again where the client did not ask for it).
* Upstream errors: 4xx keep their status and message; 5xx and broken connections become 502
  ``BackendFailed``; the batcher's timeout becomes 504.
* A background task polls the upstream's /metrics for KV headroom (see ``vllm_metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from ..config import BackendSettings
from ..errors import BackendFailed, BadRequest, EcobatchError
from ..openai_api import GenerationRequest, Usage
from ..policy import Headroom
from .base import BatchItem, GenerationResult
from .vllm_metrics import headroom_from_metrics

__all__ = ["VllmHttpBackend"]

log = logging.getLogger(__name__)
Result = GenerationResult | BaseException


def _usage(raw: Mapping[str, Any] | None) -> Usage:
    if not raw:
        raise BackendFailed("the upstream response carried no usage")
    return Usage(int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0)))


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
    return BackendFailed(f"upstream returned {status}: {message}")


class VllmHttpBackend:
    name = "vllm-http"
    continuous = True

    def __init__(self, settings: BackendSettings) -> None:
        self._settings = settings
        self._base = settings.upstream.rstrip("/")
        self._upstream_model = settings.model
        self._served = settings.served_model_name
        self._session: aiohttp.ClientSession | None = None
        self._headroom = Headroom()
        self._poller: asyncio.Task[None] | None = None

    @property
    def model(self) -> str:
        return self._served or self._upstream_model or "unknown"

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        await self._wait_for_upstream()
        self._poller = asyncio.create_task(self._poll_headroom(), name="vllm-headroom")

    async def _wait_for_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.startup_timeout_s
        last: BaseException | None = None
        while True:
            try:
                async with self._http.get(f"{self._base}/v1/models") as resp:
                    resp.raise_for_status()
                    ids = [m["id"] for m in (await resp.json())["data"]]
                if self._upstream_model is None:
                    self._upstream_model = ids[0]
                elif self._upstream_model not in ids:
                    raise BackendFailed(
                        f"backend.model={self._upstream_model!r} is not served upstream; it serves {ids}"
                    )
                return
            except BackendFailed:
                raise
            except (aiohttp.ClientError, OSError, KeyError, IndexError, ValueError) as exc:
                last = exc
            if loop.time() >= deadline:
                raise BackendFailed(
                    f"backend.upstream={self._base} did not answer /v1/models within "
                    f"backend.startup_timeout_s={self._settings.startup_timeout_s}: {last!r}"
                )
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

    async def _poll_headroom(self) -> None:
        while True:
            try:
                async with self._http.get(f"{self._base}/metrics") as resp:
                    if resp.status == 200:
                        self._headroom = headroom_from_metrics(await resp.text())
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                log.debug("headroom poll failed: %r", exc)
            await asyncio.sleep(self._settings.headroom_poll_s)

    # ---- generation ----------------------------------------------------------------------------
    def _upstream_body(self, request: GenerationRequest) -> dict[str, Any]:
        body = dict(request.body)
        body["model"] = self._upstream_model
        return body

    async def generate(self, batch: Sequence[BatchItem]) -> list[Result]:
        results: list[Result | None] = [None] * len(batch)
        groups: dict[str, list[int]] = {}
        jobs = []
        for i, item in enumerate(batch):
            req = item.request
            if req.kind == "completion" and not req.stream and self._settings.merge_completions:
                key_body = {k: v for k, v in req.body.items() if k != "prompt"}
                groups.setdefault(json.dumps(key_body, sort_keys=True, default=str), []).append(i)
            else:
                jobs.append(self._single(i, item, results))
        jobs.extend(self._merged([batch[i] for i in idx], idx, results) for idx in groups.values())
        await asyncio.gather(*jobs)
        return [r if r is not None else BackendFailed("no result from upstream") for r in results]

    async def _single(self, i: int, item: BatchItem, results: list[Result | None]) -> None:
        try:
            if item.request.stream:
                results[i] = await self._stream(item)
            else:
                results[i] = await self._post(item.request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            results[i] = exc

    async def _request_json(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            async with self._http.post(f"{self._base}{path}", json=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise _upstream_error(resp.status, text)
                data: dict[str, Any] = json.loads(text)
                return data
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendFailed(f"cannot reach upstream {self._base}: {exc!r}") from exc

    @staticmethod
    def _path(request: GenerationRequest) -> str:
        return "/v1/chat/completions" if request.kind == "chat" else "/v1/completions"

    async def _post(self, request: GenerationRequest) -> GenerationResult:
        data = await self._request_json(self._path(request), self._upstream_body(request))
        data["model"] = self.model
        return GenerationResult(usage=_usage(data.get("usage")), body=data)

    async def _merged(self, items: list[BatchItem], indices: list[int], results: list[Result | None]) -> None:
        if len(items) == 1:
            await self._single(indices[0], items[0], results)
            return
        body = self._upstream_body(items[0].request)
        body["prompt"] = [p for item in items for p in item.request.prompts]
        body["return_token_ids"] = True
        try:
            data = await self._request_json("/v1/completions", body)
        except EcobatchError as exc:
            if 400 <= exc.status < 500:  # one bad input must fail alone: retry one by one
                await asyncio.gather(
                    *(self._single(i, it, results) for i, it in zip(indices, items, strict=True))
                )
                return
            for i in indices:
                results[i] = exc
            return
        except Exception as exc:
            for i in indices:
                results[i] = exc
            return
        choices = sorted(data.get("choices", []), key=lambda c: c["index"])
        offset = 0
        for i, item in zip(indices, items, strict=True):
            request = item.request
            mine = choices[offset : offset + len(request.prompts)]
            offset += len(request.prompts)
            try:
                results[i] = self._split(request, data, mine)
            except BackendFailed as exc:
                results[i] = exc

    def _split(
        self, request: GenerationRequest, data: Mapping[str, Any], mine: list[dict[str, Any]]
    ) -> GenerationResult:
        if len(mine) != len(request.prompts) or any(
            "token_ids" not in c or c["token_ids"] is None for c in mine
        ):
            raise BackendFailed(
                "upstream did not return per-choice token_ids for a merged completion "
                "(needs vLLM >= 0.10.2); set backend.merge_completions=false"
            )
        usage = Usage(
            sum(len(c.get("prompt_token_ids") or []) for c in mine), sum(len(c["token_ids"]) for c in mine)
        )
        keep_ids = bool(request.body.get("return_token_ids"))
        out_choices = []
        for j, c in enumerate(mine):
            choice = dict(c, index=j)
            if not keep_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
            out_choices.append(choice)
        body = {
            "id": request.id,
            "object": data.get("object", "text_completion"),
            "created": request.created,
            "model": self.model,
            "choices": out_choices,
            "usage": usage.to_dict(),
        }
        return GenerationResult(usage=usage, body=body)

    async def _stream(self, item: BatchItem) -> GenerationResult:
        request = item.request
        assert item.emit is not None
        body = self._upstream_body(request)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        usage: Usage | None = None
        try:
            async with self._http.post(f"{self._base}{self._path(request)}", json=body) as resp:
                if resp.status != 200:
                    raise _upstream_error(resp.status, await resp.text())
                async for raw_line in resp.content:
                    if item.cancelled():
                        break  # closing the response aborts the request upstream
                    line = raw_line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise _upstream_error(502, json.dumps(chunk))
                    if chunk.get("usage"):
                        usage = _usage(chunk["usage"])
                        if not request.include_usage:
                            if not chunk.get("choices"):
                                continue
                            chunk.pop("usage")
                    elif "usage" in chunk and not request.include_usage:
                        chunk.pop("usage")
                    chunk["model"] = self.model
                    item.emit(chunk)
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendFailed(f"stream from upstream {self._base} broke: {exc!r}") from exc
        if usage is None:
            if item.cancelled():
                return GenerationResult(usage=Usage())
            raise BackendFailed("the upstream stream ended without a usage chunk")
        return GenerationResult(usage=usage)

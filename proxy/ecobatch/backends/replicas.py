"""Several vLLM OpenAI servers of the same model behind one proxy (``backend.replicas``).

``ReplicaSet`` is what the app sees as the engine: one model name, one ``prepare``, one health view.
The requests themselves go to its ``members`` (one ``VllmHttpBackend`` each, with its own circuit
breaker, health probe and KV headroom), chosen per request by the gate (``gate``, ``routing``).

Start-up: the proxy is ready as soon as **one** replica answers; the others are waited for in the
background and take requests once they answer (``/health`` lists each one's state). A replica that
serves another model is a configuration error and stops the start-up. A request is refused at once
(503 ``upstream_down``) only when no replica is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry

from ..config import BackendSettings
from ..domain import GenerationRequest, Headroom
from ..errors import ConfigError, UpstreamDown
from .base import EngineShape, Progress
from .vllm_http import VllmHttpBackend

__all__ = ["ReplicaSet"]

log = logging.getLogger(__name__)
#: how often a replica still starting after the proxy is ready says what it waits for
_LATE_LOG_EVERY_S = 30.0


class ReplicaSet:
    name = "vllm-http"
    shape: ClassVar[EngineShape] = "continuous"
    metrics_registry: CollectorRegistry | None = None

    def __init__(self, settings: BackendSettings) -> None:
        if not settings.replicas:
            raise ValueError("ReplicaSet needs backend.replicas")
        self.names = settings.replica_names
        self.members = [
            VllmHttpBackend(dataclasses.replace(settings, upstream=r.url, replicas=[]))
            for r in settings.replicas
        ]
        self._waiting: dict[str, str] = {}  # replica name -> what its start waits for
        self._starts: list[asyncio.Task[None]] = []
        self._ready = False
        self._last_late_log_s = float("-inf")

    @property
    def model(self) -> str:
        """The served name: the configured one, else the model of the first replica that answered."""
        started = [m for m in self.members if m.started]
        return (started or self.members)[0].model

    async def start(self, progress: Progress) -> None:
        """Start every replica; return once one of them is up (the rest come up in the background)."""

        def reporter(name: str) -> Progress:
            def report(message: str) -> None:
                self._waiting[name] = message
                if not self._ready:
                    progress("; ".join(f"{n}: {m}" for n, m in sorted(self._waiting.items())))
                elif time.monotonic() - self._last_late_log_s >= _LATE_LOG_EVERY_S:
                    self._last_late_log_s = time.monotonic()
                    log.warning("replica %s is not up yet: %s", name, message)

            return report

        self._starts = [
            asyncio.create_task(member.start(reporter(name)), name=f"ecobatch-start-{name}")
            for name, member in zip(self.names, self.members, strict=True)
        ]
        for index, task in enumerate(self._starts):
            task.add_done_callback(self._started(index))
        pending: set[asyncio.Task[None]] = set(self._starts)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a replica serving another model: a configuration error, stop here
                started = [m for m in self.members if m.started]
                if started:
                    self._agree_on_model(started)
                    self._ready = True
                    return
        except BaseException:  # a configuration error, or start-up timed out: the others stop too
            for task in self._starts:
                task.cancel()
            await asyncio.gather(*self._starts, return_exceptions=True)
            raise

    def _agree_on_model(self, started: list[VllmHttpBackend]) -> None:
        """Every replica must serve the model the first one serves: those still starting are held to it
        (one that serves another is refused, and says so in /health); two that answered together with
        different models stop the start-up."""
        model = started[0].upstream_model
        others = sorted({str(m.upstream_model) for m in started} - {str(model)})
        if others:
            names = ", ".join(repr(m) for m in [model, *others])
            raise ConfigError(
                f"backend.replicas serve different models ({names}); set backend.model to the one to serve",
                field="backend.replicas",
            )
        for member in self.members:
            member.require_model(model)

    def _started(self, index: int) -> Callable[[asyncio.Task[None]], None]:
        name = self.names[index]

        def done(task: asyncio.Task[None]) -> None:
            self._waiting.pop(name, None)
            if not task.cancelled() and task.exception() is None:
                log.info("replica %s is up: %s", name, self.members[index].upstream)
            elif self._ready and not task.cancelled():
                log.error("replica %s cannot serve: %s", name, task.exception())
                self._waiting[name] = str(task.exception())

        return done

    async def close(self) -> None:
        for task in self._starts:
            task.cancel()
        for task in self._starts:
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(*(m.close() for m in self.members))

    def headroom(self) -> Headroom:
        """The replicas' headroom summed (each replica's own is what the gate uses)."""
        return _summed([m.headroom() for m in self.members])

    def health(self) -> dict[str, Any]:
        replicas = []
        for name, member in zip(self.names, self.members, strict=True):
            state = member.health()
            if name in self._waiting:
                state["last_error"] = state.get("last_error") or self._waiting[name]
            replicas.append({"name": name, **state})
        up = [r for r in replicas if r["state"] == "up"]
        return {
            "state": "up" if up else "down",
            "replicas_up": len(up),
            "replicas": replicas,
            "last_error": None if up else "; ".join(f"{r['name']}: {r['last_error']}" for r in replicas),
        }

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Checked against a replica that is up (they serve the same model with the same limits)."""
        states = [m.health() for m in self.members]
        for member, state in zip(self.members, states, strict=True):
            if state["state"] == "up":
                return await member.prepare(request)
        reasons = "; ".join(
            f"{n}: {s.get('last_error') or s['state']}" for n, s in zip(self.names, states, strict=True)
        )
        raise UpstreamDown(f"no vLLM replica is up ({reasons}); retry later", retry_after_s=5.0)


def _summed(rooms: Sequence[Headroom]) -> Headroom:
    def total(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    return Headroom(
        kv_free_tokens=total([h.kv_free_tokens for h in rooms]),
        kv_capacity_tokens=total([h.kv_capacity_tokens for h in rooms]),
        running=total([h.running for h in rooms]),
        waiting=total([h.waiting for h in rooms]),
    )

"""The aiohttp application: OpenAI-compatible routes in front of the batcher.

``create_app(settings)`` builds everything; the backend, the energy meter and the batcher are started
and stopped in a ``cleanup_ctx`` generator. Tests inject a registry, a backend or a meter.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` false or true),
``GET /v1/models``, ``GET /health``, ``GET /metrics``, and ``GET/PUT /ecobatch/batching`` to read or
change the batching settings at run time. Non-streaming responses carry the request's energy in
headers: ``X-Ecobatch-Energy-Joules``, ``X-Ecobatch-Energy-Source`` (``nvml`` or ``model``),
``X-Ecobatch-Batch-Size`` and ``X-Ecobatch-Queue-Wait-Ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .backends import create_backend
from .backends.base import Backend
from .batcher import Batcher, Outcome
from .config import BatchingSettings, Settings, build_section
from .energy import EnergyMeter, ModelledMeter
from .errors import BadRequest, ConfigError, EcobatchError, Overloaded
from .gpu import discover_gpus
from .metrics import Metrics
from .nvml_meter import NvmlMeter
from .openai_api import GenerationRequest, models_response, parse_chat, parse_completion
from .profile import EnergyProfile, load_profile

__all__ = ["Runtime", "create_app"]

log = logging.getLogger(__name__)
MeterFactory = Callable[[EnergyProfile, Settings], EnergyMeter]
Parser = Callable[[Any, str], GenerationRequest]


@dataclass(slots=True)
class Runtime:
    """What the routes need; filled in at start-up."""

    settings: Settings
    registry: CollectorRegistry
    profile: EnergyProfile
    backend: Backend
    meter: EnergyMeter | None = None
    metrics: Metrics | None = None
    batcher: Batcher | None = None

    def ready(self) -> tuple[Batcher, Metrics]:
        if self.batcher is None or self.metrics is None:
            raise EcobatchError("ecobatch is starting up", status=503)
        return self.batcher, self.metrics


RUNTIME = web.AppKey("runtime", Runtime)


def _error_response(exc: EcobatchError) -> web.Response:
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(int(exc.retry_after_s))
    return web.json_response(exc.to_body(), status=exc.status, headers=headers)


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as an OpenAI error body, 404s and 405s included; nothing leaks as a bare 500."""
    try:
        return await handler(request)
    except EcobatchError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type = "invalid_request_error" if exc.status < 500 else "internal_error"
        body = {"error": {"message": exc.reason, "type": error_type, "param": None, "code": exc.status}}
        return web.json_response(body, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unhandled error on %s", request.path)
        return web.json_response(
            {
                "error": {
                    "message": f"internal error: {exc!r}",
                    "type": "internal_error",
                    "param": None,
                    "code": None,
                }
            },
            status=500,
        )


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 text") from None


def _energy_headers(outcome: Outcome) -> dict[str, str]:
    return {
        "X-Ecobatch-Energy-Joules": f"{outcome.energy_joules:.6g}",
        "X-Ecobatch-Energy-Source": outcome.energy_source,
        "X-Ecobatch-Batch-Size": str(outcome.batch_size),
        "X-Ecobatch-Queue-Wait-Ms": f"{outcome.queue_wait_s * 1000:.1f}",
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _generation(request: web.Request, parse: Parser) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    started_s = time.monotonic()
    batcher, metrics = runtime.ready()
    model = runtime.backend.model
    status = "200"
    gen: GenerationRequest | None = None
    try:
        gen = parse(await _read_json(request), model)
        if gen.stream:
            return await _stream(request, batcher, gen)
        pending = batcher.submit(gen)
        try:
            outcome = await pending.future
        except asyncio.CancelledError:  # the client went away: leave the batch
            pending.future.cancel()
            status = "499"
            raise
        assert outcome.result.body is not None
        return web.json_response(outcome.result.body, headers=_energy_headers(outcome))
    except EcobatchError as exc:
        status = str(exc.status)
        return _error_response(exc)
    finally:
        metrics.requests.labels(model, status).inc()
        stream = "true" if gen is not None and gen.stream else "false"
        metrics.request_duration.labels(model, stream).observe(time.monotonic() - started_s)


async def _stream(request: web.Request, batcher: Batcher, gen: GenerationRequest) -> web.StreamResponse:
    """Server-sent events: the backend's chunks as they come, then ``data: [DONE]``. An error before the
    first chunk is a plain HTTP error; one after it is an ``error`` event before ``[DONE]``."""
    chunks: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    pending = batcher.submit(gen, emit=chunks.put_nowait)
    pending.future.add_done_callback(lambda _: chunks.put_nowait(None))
    try:
        chunk = await chunks.get()
        if chunk is None and pending.future.exception() is not None:
            error = pending.future.exception()
            raise error if isinstance(error, EcobatchError) else EcobatchError(str(error))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        while chunk is not None:
            await response.write(_sse(chunk))
            chunk = await chunks.get()
        error = pending.future.exception()
        if error is not None:
            body = error.to_body() if isinstance(error, EcobatchError) else {"error": {"message": str(error)}}
            await response.write(_sse(body))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        pending.future.cancel()
        raise


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, parse_completion)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, parse_chat)


async def _models(request: web.Request) -> web.Response:
    return web.json_response(models_response(request.app[RUNTIME].backend.model))


async def _health(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    batcher = runtime.batcher
    body = {
        "status": "ok" if batcher is not None else "starting",
        "backend": runtime.backend.name,
        "model": runtime.backend.model,
        "energy_source": runtime.meter.source if runtime.meter else None,
        "profile": {"name": runtime.profile.name, "source": runtime.profile.source},
        "queue_depth": batcher.queue_depth if batcher else 0,
        "inflight": batcher.inflight if batcher else 0,
    }
    return web.json_response(body, status=200 if batcher is not None else 503)


async def _metrics(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[RUNTIME].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _batching_view(batcher: Batcher) -> dict[str, Any]:
    decision = batcher.last_decision
    return {
        "settings": dataclasses.asdict(batcher.settings),
        "last_decision": dataclasses.asdict(decision) if decision else None,
    }


async def _get_batching(request: web.Request) -> web.Response:
    batcher, _ = request.app[RUNTIME].ready()
    return web.json_response(_batching_view(batcher))


async def _put_batching(request: web.Request) -> web.Response:
    """Change batching settings at run time: a JSON object of BatchingSettings fields."""
    batcher, _ = request.app[RUNTIME].ready()
    changes = await _read_json(request)
    if not isinstance(changes, dict):
        raise BadRequest("the body must be a JSON object of batching settings")
    merged = {**dataclasses.asdict(batcher.settings), **changes}
    try:
        settings: BatchingSettings = build_section(BatchingSettings, merged, "batching")
    except ConfigError as exc:
        raise BadRequest(str(exc), param=exc.field) from None
    batcher.reconfigure(settings)
    return web.json_response(_batching_view(batcher))


def _default_meter(profile: EnergyProfile, settings: Settings) -> EnergyMeter:
    """NVML where asked for or found (not for the simulated backend), else the announced modelled meter."""
    energy = settings.energy
    if energy.meter != "model" and (energy.meter == "nvml" or settings.backend.kind != "simulated"):
        gpus = discover_gpus(energy.gpu_indices)
        if gpus:
            return NvmlMeter(
                gpus,
                prefill_weight=energy.prefill_weight,
                sample_interval_s=energy.sample_interval_s,
                idle_power_w=energy.idle_power_w,
            )
        if energy.meter == "nvml":
            raise ConfigError("energy.meter='nvml' but NVML found no GPU", field="energy.meter")
    log.warning(
        "energy: no GPU energy counter is used; joules are MODELLED from profile %r (source=%s) and exported "
        'with source="model"',
        profile.name,
        profile.source,
    )
    return ModelledMeter(profile, energy.prefill_weight)


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    backend: Backend | None = None,
    meter_factory: MeterFactory = _default_meter,
    profile: EnergyProfile | None = None,
) -> web.Application:
    profile = profile or load_profile(settings.energy.profile_path)
    runtime = Runtime(
        settings=settings,
        registry=registry or CollectorRegistry(),
        profile=profile,
        backend=backend or create_backend(settings, profile),
    )
    app = web.Application(middlewares=[_openai_errors], client_max_size=32 * 1024 * 1024)
    app[RUNTIME] = runtime

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await runtime.backend.start()
        meter = meter_factory(runtime.profile, settings)
        metrics = Metrics(
            runtime.registry,
            model=runtime.backend.model,
            carbon_g_per_kwh=settings.energy.carbon_g_per_kwh,
            price_per_kwh=settings.energy.price_per_kwh,
            currency=settings.energy.currency,
        )
        metrics.describe_profile(runtime.profile)
        if isinstance(meter, NvmlMeter):
            idle = metrics.idle_energy.labels(meter.source, meter.gpu)
            power = metrics.power.labels(meter.source, meter.gpu)

            def on_interval(active_j: float, idle_j: float, interval_s: float) -> None:
                idle.inc(idle_j)
                if interval_s > 0:
                    power.set((active_j + idle_j) / interval_s)

            meter.on_interval = on_interval
        await meter.start()
        batcher = Batcher(
            runtime.backend,
            meter,
            metrics,
            runtime.profile,
            settings.batching,
            request_timeout_s=settings.backend.request_timeout_s,
        )
        await batcher.start()
        runtime.meter, runtime.metrics, runtime.batcher = meter, metrics, batcher
        log.info(
            "ecobatch ready: backend=%s model=%s profile=%s (%s)",
            runtime.backend.name,
            runtime.backend.model,
            runtime.profile.name,
            runtime.profile.source,
        )
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await batcher.close(settings.server.shutdown_grace_s)
            await meter.close()
            await runtime.backend.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/ecobatch/batching", _get_batching)
    app.router.add_put("/ecobatch/batching", _put_batching)
    return app

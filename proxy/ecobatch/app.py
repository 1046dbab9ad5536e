"""The aiohttp application: OpenAI-compatible routes in front of the dispatcher.

``create_app(settings)`` builds everything; the engine, the energy meter and the dispatcher (a static
batcher or a continuous gate, by the engine's shape) are started and stopped in a ``cleanup_ctx``
generator. Tests inject a registry, an engine, a meter factory or a clock.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` false or true),
``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``GET/PUT /ecobatch/batching`` (read or change the
batching settings at run time) and ``GET /ecobatch/energy/{request_id}`` (a request's energy receipt).

A request is validated against the API, then against the engine (``prepare``: context length,
tokenization off the event loop), and only then queued. Responses are never held for the meter:
non-streaming ones carry ``X-Ecobatch-Request-Id``, a provisional figure labelled as one
(``X-Ecobatch-Energy-Provisional-Joules``, modelled from the profile), the source that will settle it
(``X-Ecobatch-Energy-Source``: ``nvml``, ``dcgm`` or ``model``), ``X-Ecobatch-Batch-Size`` and
``X-Ecobatch-Queue-Wait-Ms``; the settled joules are at ``/ecobatch/energy/{request_id}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .admission import Outcome
from .backends import create_engine
from .backends.base import ContinuousEngine, StaticEngine
from .batcher import StaticBatcher
from .clock import Clock, MonotonicClock
from .config import BACKEND_SHAPES, BatchingSettings, Settings, build_section
from .dispatcher import Dispatcher
from .domain import GenerationRequest
from .energy.choose import build_meter
from .energy.ledger import SettledRequest
from .energy.meter import Meter
from .energy.receipts import Receipts
from .errors import BadRequest, ConfigError, EcobatchError, NotFound, Overloaded
from .gate import ContinuousGate
from .metrics import Metrics
from .openai_api import models_response, parse_chat, parse_completion
from .profile import EnergyProfile, load_profile

__all__ = ["Runtime", "create_app"]

log = logging.getLogger(__name__)
MeterFactory = Callable[[Settings, EnergyProfile, Clock], Meter]
Parser = Callable[[Any, str], GenerationRequest]
Engine = StaticEngine | ContinuousEngine


@dataclass(slots=True)
class Runtime:
    """What the routes need; filled in at start-up."""

    settings: Settings
    registry: CollectorRegistry
    profile: EnergyProfile
    engine: Engine
    receipts: Receipts
    meter: Meter | None = None
    metrics: Metrics | None = None
    dispatcher: Dispatcher | None = None

    def ready(self) -> tuple[Dispatcher, Metrics]:
        if self.dispatcher is None or self.metrics is None:
            raise EcobatchError("ecobatch is starting up", status=503)
        return self.dispatcher, self.metrics


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


def _energy_headers(request: GenerationRequest, outcome: Outcome) -> dict[str, str]:
    return {
        "X-Ecobatch-Request-Id": request.id,
        "X-Ecobatch-Energy-Provisional-Joules": f"{outcome.provisional_joules:.6g}",
        "X-Ecobatch-Energy-Provisional-Basis": "profile (modelled)",
        "X-Ecobatch-Energy-Source": outcome.energy_source,
        "X-Ecobatch-Batch-Size": str(outcome.group_size),
        "X-Ecobatch-Queue-Wait-Ms": f"{outcome.queue_wait_s * 1000:.1f}",
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _generation(request: web.Request, parse: Parser) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    started_s = time.monotonic()
    dispatcher, metrics = runtime.ready()
    model = runtime.engine.model
    status = "200"
    gen: GenerationRequest | None = None
    try:
        gen = await runtime.engine.prepare(parse(await _read_json(request), model))
        if gen.stream:
            return await _stream(request, dispatcher, gen)
        pending = dispatcher.submit(gen)
        try:
            outcome = await pending.future
        except asyncio.CancelledError:  # the client went away: leave the queue, or stop the work
            pending.future.cancel()
            raise
        assert outcome.result.body is not None
        return web.json_response(outcome.result.body, headers=_energy_headers(gen, outcome))
    except EcobatchError as exc:
        status = str(exc.status)
        return _error_response(exc)
    except (asyncio.CancelledError, ConnectionResetError):
        status = "499"  # the client left (nginx's code for it)
        raise
    finally:
        metrics.requests.labels(model, status).inc()
        stream = "true" if gen is not None and gen.stream else "false"
        metrics.request_duration.labels(model, stream).observe(time.monotonic() - started_s)


async def _stream(request: web.Request, dispatcher: Dispatcher, gen: GenerationRequest) -> web.StreamResponse:
    """Server-sent events: the engine's chunks as they come, then ``data: [DONE]``. An error before the
    first chunk is a plain HTTP error; one after it is an ``error`` event before ``[DONE]``."""
    chunks: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    pending = dispatcher.submit(gen, emit=chunks.put_nowait)
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
                "X-Ecobatch-Request-Id": gen.id,
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
    return web.json_response(models_response(request.app[RUNTIME].engine.model))


async def _health(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    dispatcher = runtime.dispatcher
    body = {
        "status": "ok" if dispatcher is not None else "starting",
        "backend": runtime.engine.name,
        "engine_shape": runtime.engine.shape,
        "model": runtime.engine.model,
        "energy_source": runtime.meter.source if runtime.meter else None,
        "profile": {
            "name": runtime.profile.name,
            "source": runtime.profile.source,
            "kind": runtime.profile.kind,
        },
        "queue_depth": dispatcher.queue_depth if dispatcher else 0,
        "inflight": dispatcher.inflight if dispatcher else 0,
    }
    return web.json_response(body, status=200 if dispatcher is not None else 503)


async def _metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    payload = generate_latest(runtime.registry)
    if runtime.engine.metrics_registry is not None:  # an in-process engine's own series (vLLM's)
        payload += generate_latest(runtime.engine.metrics_registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _batching_view(dispatcher: Dispatcher, engine: Engine) -> dict[str, Any]:
    decision = dispatcher.last_decision
    return {
        "settings": dataclasses.asdict(dispatcher.settings),
        "last_decision": dataclasses.asdict(decision) if decision else None,
        "inflight": dispatcher.inflight,
        "queue_depth": dispatcher.queue_depth,
        "engine_headroom": dataclasses.asdict(engine.headroom()),
    }


async def _get_batching(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    dispatcher, _ = runtime.ready()
    return web.json_response(_batching_view(dispatcher, runtime.engine))


async def _put_batching(request: web.Request) -> web.Response:
    """Change batching settings at run time: a JSON object of BatchingSettings fields."""
    runtime = request.app[RUNTIME]
    dispatcher, _ = runtime.ready()
    changes = await _read_json(request)
    if not isinstance(changes, dict):
        raise BadRequest("the body must be a JSON object of batching settings")
    merged = {**dataclasses.asdict(dispatcher.settings), **changes}
    try:
        settings: BatchingSettings = build_section(BatchingSettings, merged, "batching")
    except ConfigError as exc:
        raise BadRequest(str(exc), param=exc.field) from None
    dispatcher.reconfigure(settings)
    dispatcher.decide()  # show the decision under the new settings
    return web.json_response(_batching_view(dispatcher, runtime.engine))


async def _get_energy(request: web.Request) -> web.Response:
    """A request's energy receipt: ``pending`` (with the provisional, modelled figure) until the meter
    has passed its end, then ``settled`` with the joules from ``source``."""
    request_id = request.match_info["request_id"]
    receipt = request.app[RUNTIME].receipts.get(request_id)
    if receipt is None:
        raise NotFound(
            f"no energy receipt for request {request_id!r} (unknown, or too old)", param="request_id"
        )
    return web.json_response(receipt)


def _check_profile_shape(profile: EnergyProfile, shape: str, backend: str) -> None:
    if profile.kind == shape:
        return
    wanted = (
        "per concurrency (kind: continuous)" if shape == "continuous" else "per batch size (kind: static)"
    )
    raise ConfigError(
        f"energy.profile {profile.name!r} is a {profile.kind} profile, but backend.kind={backend!r} is a "
        f"{shape} engine and needs a profile {wanted}; leave energy.profile unset for the embedded "
        f"reference, or measure one with `ecobatch calibrate`",
        field="energy.profile",
    )


def _wire_ledger(meter: Meter, metrics: Metrics, receipts: Receipts) -> None:
    """Settled requests and intervals go to the metrics and the receipts, off the request path."""
    ledger = meter.ledger

    def on_request(settled: SettledRequest) -> None:
        metrics.observe_settled(settled, ledger.gpu)
        receipts.settle(settled)

    ledger.on_request = on_request
    ledger.on_interval = lambda split: metrics.observe_interval(split, ledger.source, ledger.gpu)


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    engine: Engine | None = None,
    meter_factory: MeterFactory | None = None,
    profile: EnergyProfile | None = None,
    clock: Clock | None = None,
) -> web.Application:
    shape = engine.shape if engine is not None else BACKEND_SHAPES[settings.backend.kind]
    profile = profile or load_profile(settings.energy.profile_path(shape))
    _check_profile_shape(profile, shape, settings.backend.kind)
    the_clock: Clock = clock or MonotonicClock()
    runtime = Runtime(
        settings=settings,
        registry=registry or CollectorRegistry(),
        profile=profile,
        engine=engine or create_engine(settings, profile),
        receipts=Receipts(),
    )
    app = web.Application(middlewares=[_openai_errors], client_max_size=32 * 1024 * 1024)
    app[RUNTIME] = runtime

    def make_meter(s: Settings, p: EnergyProfile, c: Clock) -> Meter:
        return build_meter(s, p, clock=c)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        engine = runtime.engine
        await engine.start()
        meter: Meter | None = None
        try:
            meter = (meter_factory or make_meter)(settings, runtime.profile, the_clock)
            metrics = Metrics(
                runtime.registry,
                model=engine.model,
                carbon_g_per_kwh=settings.energy.carbon_g_per_kwh,
                price_per_kwh=settings.energy.price_per_kwh,
                currency=settings.energy.currency,
            )
            metrics.describe_profile(runtime.profile)
            _wire_ledger(meter, metrics, runtime.receipts)
            await meter.start()
            kind = StaticBatcher if engine.shape == "static" else ContinuousGate
            dispatcher = kind(
                engine,
                meter.ledger,
                runtime.receipts,
                metrics,
                runtime.profile,
                settings.batching,
                request_timeout_s=settings.backend.request_timeout_s,
                clock=the_clock,
            )
            await dispatcher.start()
        except BaseException:  # a failed start-up still releases the engine and the meter
            if meter is not None:
                await meter.close()
            await engine.close()
            raise
        runtime.meter, runtime.metrics, runtime.dispatcher = meter, metrics, dispatcher
        log.info(
            "ecobatch ready: backend=%s (%s engine) model=%s profile=%s (%s, %s) energy=%s",
            engine.name,
            engine.shape,
            engine.model,
            runtime.profile.name,
            runtime.profile.kind,
            runtime.profile.source,
            meter.source,
        )
        try:
            yield
        finally:
            runtime.dispatcher = None
            try:
                await dispatcher.close(settings.server.shutdown_grace_s)
            finally:
                await meter.close()
                await engine.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/ecobatch/batching", _get_batching)
    app.router.add_put("/ecobatch/batching", _put_batching)
    app.router.add_get("/ecobatch/energy/{request_id}", _get_energy)
    return app

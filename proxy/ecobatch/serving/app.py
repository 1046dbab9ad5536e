"""The aiohttp application: OpenAI-compatible routes in front of the dispatcher.

``create_app(settings)`` builds the ``Runtime`` (engine, energy accounts, dispatcher, metrics, receipts)
and the routes. Its ``cleanup_ctx`` brings the runtime up, at once (``start_in_background=False``, for
tests and embedding) or in the background (``ecobatch serve``: the server listens first and answers 503
with the reason until the engine is ready), and drains and closes it at the end. Tests inject a
registry, an engine, a meter factory or a clock.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` false or true),
``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``GET/PUT /ecobatch/batching`` (read or change the
batching settings at run time; admin key) and ``GET /ecobatch/energy/{request_id}`` (a request's
energy receipt).

A request is checked against the API, then against the engine (``prepare``: context length,
tokenization off the event loop), and only then queued. Responses are never held for the meter:
non-streaming ones carry ``X-Ecobatch-Request-Id``, a provisional figure labelled as one
(``X-Ecobatch-Energy-Provisional-Joules``, modelled from the profile), the source that will settle it
(``X-Ecobatch-Energy-Source``: ``nvml``, ``dcgm`` or ``model``), ``X-Ecobatch-Batch-Size`` and
``X-Ecobatch-Queue-Wait-Ms``; the settled joules are at ``/ecobatch/energy/{request_id}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..clock import Clock, MonotonicClock
from ..config import (
    BACKEND_SHAPES,
    SHAPE_ONLY_SETTINGS,
    BatchingSettings,
    ReplicaSettings,
    Settings,
    build_section,
)
from ..domain import GenerationRequest, Tier
from ..energy.account import EnergyAccount
from ..energy.choose import MeterSpec, build_meter
from ..energy.ledger import LedgerReports
from ..energy.meter import Meter
from ..energy.receipts import Receipts
from ..engines import create_static_engine
from ..engines.base import ContinuousEngine, StaticEngine
from ..errors import (
    BadRequest,
    ConfigError,
    EcobatchError,
    NotFound,
    Retryable,
)
from ..profile import EnergyProfile, load_profile
from .admission import Outcome
from .auth import AccessKeys, Keys, check_admin_key, check_api_key, load_keys
from .dispatcher import Dispatcher
from .metrics import Metrics
from .openai_api import (
    SERVICE_TIER_NAMES,
    ChunkRenderer,
    models_response,
    parse_chat,
    parse_completion,
    response_body,
)
from .pool import MeterFactory, PoolHealth, Replica, ReplicaPool, build_pool, make_replica
from .replica_sources import ReplicaSource, source_of
from .runtime import Backend, Runtime

__all__ = ["RUNTIME", "create_app", "metrics_app"]

log = logging.getLogger(__name__)
Parser = Callable[[Any, str], GenerationRequest]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNTIME = web.AppKey("runtime", Runtime)
KEYS = web.AppKey("keys", AccessKeys)
BRING_UP = web.AppKey("bring_up", asyncio.Task)


def _error_response(exc: EcobatchError) -> web.Response:
    headers = {}
    if isinstance(exc, Retryable):
        headers["Retry-After"] = str(max(1, int(exc.retry_after_s)))
    return web.json_response(exc.to_body(), status=exc.status, headers=headers)


#: the OpenAI-style ``code`` of aiohttp's own errors (OpenAI's API answers unknown routes with a null code)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The keys checked (``_check_access``), then the handler; every error leaves as an OpenAI error
    body, 401s, 404s, 405s and 413s included; nothing leaks as a bare 500. (One middleware rather than
    two: each layer costs every request a coroutine.)"""
    try:
        _check_access(request)
        return await handler(request)
    except EcobatchError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type = "invalid_request_error" if exc.status < 500 else "internal_error"
        message = exc.text if exc.status == 413 and exc.text else exc.reason
        code = _HTTP_CODES.get(exc.status)  # a string or null, as in every other error body
        body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        return web.json_response(body, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unhandled error on %s", request.path)
        body = {"error": {"message": f"internal error: {exc!r}", "type": "internal_error", "param": None}}
        return web.json_response(body, status=500)


def _check_access(request: web.Request) -> None:
    """API keys for /v1 and receipts, admin keys for /ecobatch/batching (see ``auth``)."""
    keys = request.app[KEYS]
    path = request.path
    if path.startswith("/ecobatch/batching"):
        check_admin_key(keys.admin, request.headers.get("Authorization"))
    elif path.startswith(("/v1/", "/ecobatch/")):
        check_api_key(keys.api, request.headers.get("Authorization"))


async def _read_json(request: web.Request) -> Any:
    """The body, decoded once; the routes check it against their schema (``openai_api``, ``config``)."""
    body = await request.read()
    try:
        return msgspec.json.decode(body)
    except msgspec.ValidationError:  # valid JSON holding a number past a 64-bit float
        where = _infinite_at(json.loads(body))
        raise BadRequest(
            f"'{where or 'a number'}' is out of range: a number must fit a 64-bit float", param=where
        ) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON (UTF-8): {exc}") from None
    except RecursionError:  # arrays or objects nested past what the decoder follows (~1,000 levels)
        raise BadRequest("the request body is nested too deeply") from None


def _infinite_at(value: Any, path: str = "") -> str | None:
    """Where in a decoded body a number overflowed to infinity (the error path only)."""
    if isinstance(value, float) and math.isinf(value):
        return path or None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _infinite_at(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip("."))
        if found:
            return found
    return None


_encode = msgspec.json.Encoder().encode


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(body), status=status, headers=headers, content_type="application/json")


def _with_tier(body: dict[str, Any], tier: Tier) -> dict[str, Any]:
    """A response body or chunk saying which tier served it (OpenAI's ``service_tier``)."""
    body["service_tier"] = SERVICE_TIER_NAMES[tier]
    return body


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
    return b"data: " + _encode(payload) + b"\n\n"


async def _generation(request: web.Request, parse: Parser) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    started_s = time.monotonic()
    metrics = runtime.metrics
    status = "200"
    gen: GenerationRequest | None = None
    try:
        dispatcher = runtime.ready_dispatcher()
        gen = await runtime.engine.prepare(parse(await _read_json(request), runtime.engine.model))
        if gen.stream:
            return await _stream(request, dispatcher, gen)
        pending = dispatcher.submit(gen)
        try:
            outcome = await pending.future
        except asyncio.CancelledError:  # the client went away: leave the queue, or stop the work
            dispatcher.withdraw(pending)
            raise
        body = response_body(gen, outcome.result)
        return _json(_with_tier(body, outcome.tier), headers=_energy_headers(gen, outcome))
    except EcobatchError as exc:
        status = str(exc.status)
        return _error_response(exc)
    except (asyncio.CancelledError, ConnectionResetError):
        status = "499"  # the client left (nginx's code for it)
        raise
    finally:
        stream = "true" if gen is not None and gen.stream else "false"
        metrics.observe_request(status, stream, time.monotonic() - started_s)


async def _stream(request: web.Request, dispatcher: Dispatcher, gen: GenerationRequest) -> web.StreamResponse:
    """Server-sent events: the engine's outputs rendered as chunks as the client reads them, then
    ``data: [DONE]``. An error before the first output is a plain HTTP error; one after it is an
    ``error`` event before ``[DONE]``. The engine is pulled at its own speed (``stream``): what a slow
    client has not read waits, at most its response."""
    pending = dispatcher.submit(gen)
    outputs = pending.outputs
    assert outputs is not None
    render = ChunkRenderer(gen)
    try:
        output = await anext(outputs, None)
        if output is None:  # the stream ends once the request is resolved
            error = pending.future.exception()
            if error is not None:
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
        while output is not None:
            for chunk in render.chunks(output):
                await response.write(_sse(_with_tier(chunk, pending.tier)))
            output = await anext(outputs, None)
        error = pending.future.exception()
        if error is not None:
            body = error.to_body() if isinstance(error, EcobatchError) else {"error": {"message": str(error)}}
            await response.write(_sse(body))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    except BaseException:  # the client left, or writing failed: the engine's request must not run on
        if not pending.future.done():
            dispatcher.withdraw(pending)
        raise


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, parse_completion)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, parse_chat)


async def _models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.ready_dispatcher()  # the model's name is the engine's, known once it is up
    return web.json_response(models_response(runtime.engine.model))


async def _health(request: web.Request) -> web.Response:
    """200 once ready and the engine up; 503 with the reason while starting, draining, failed, or while
    a remote engine is down."""
    runtime = request.app[RUNTIME]
    dispatcher = runtime.dispatcher
    meter = runtime.meter
    health = runtime.engine.health()
    engine: dict[str, Any] = {"state": health.state, "last_error": health.last_error}
    if isinstance(runtime.engine, ReplicaPool) and isinstance(health, PoolHealth):
        replicas = runtime.engine.replicas
        views = []
        for replica, (name, state) in zip(replicas, health.replicas, strict=True):
            view = {"name": name, **state.to_dict()}
            if len(replicas) > 1:
                view["inflight"] = replica.inflight
                view["energy_gpu"] = replica.meter.gpu
            views.append(view)
        if len(replicas) > 1:
            engine["replicas_up"] = sum(1 for _, state in health.replicas if state.up)
            engine["replicas"] = views
        elif views:
            engine = views[0]
            engine.pop("name")
    serving = runtime.state == "ready" and health.up
    status = "ok" if serving else ("upstream_down" if runtime.state == "ready" else runtime.state)
    body = {
        "status": status,
        "reason": runtime.reason if runtime.state != "ready" else health.last_error or "ready",
        "engine": engine,
        "backend": runtime.engine.name,
        "engine_shape": runtime.engine.shape,
        "model": runtime.engine.model,
        # the simulated engine's clock: 1 is real time
        **(
            {"sim_time_scale": runtime.settings.backend.sim_time_scale}
            if runtime.engine.name == "simulated"
            else {}
        ),
        "energy_source": meter.source if meter else None,
        "energy_counter_readable": all(m.readable for m in runtime.meters) if meter else None,
        "profile": {
            "name": runtime.profile.name,
            "source": runtime.profile.source,
            "kind": runtime.profile.kind,
        },
        "queue_depth": dispatcher.queue_depth if dispatcher else 0,
        "inflight": dispatcher.inflight if dispatcher else 0,
    }
    headers = {} if serving else {"Retry-After": "5"}
    return web.json_response(body, status=200 if serving else 503, headers=headers)


def _exposition(runtime: Runtime) -> bytes:
    payload = generate_latest(runtime.registry)
    if runtime.engine.metrics_registry is not None:  # an in-process engine's own series (vLLM's)
        payload += generate_latest(runtime.engine.metrics_registry)
    return payload


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=_exposition(request.app[RUNTIME]), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _get_batching(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return web.json_response(runtime.ready_dispatcher().view())


async def _put_batching(request: web.Request) -> web.Response:
    """Change batching settings at run time: a JSON object of BatchingSettings fields."""
    runtime = request.app[RUNTIME]
    dispatcher = runtime.ready_dispatcher()
    changes = await _read_json(request)
    if not isinstance(changes, dict):
        raise BadRequest("the body must be a JSON object of batching settings")
    current = msgspec.structs.asdict(dispatcher.settings)
    for key, value in changes.items():  # a change this engine would never read is refused, not ignored
        only = SHAPE_ONLY_SETTINGS.get(key)
        if only is not None and only != dispatcher.shape and value != current.get(key):
            raise BadRequest(
                f"batching.{key} applies to {only} engines; this one is {dispatcher.shape}",
                param=f"batching.{key}",
            )
    merged = {**current, **changes}
    try:
        settings = build_section(BatchingSettings, merged, "batching")
    except ConfigError as exc:
        raise BadRequest(str(exc), param=exc.field) from None
    dispatcher.reconfigure(settings)
    log.info("batching settings changed at run time: %s", changes)
    return web.json_response(dispatcher.view())


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


def _default_meter(spec: MeterSpec, profile: EnergyProfile, clock: Clock, reports: LedgerReports) -> Meter:
    return build_meter(spec, profile, clock=clock, reports=reports)


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    engine: StaticEngine | ContinuousEngine | None = None,
    meter_factory: MeterFactory | None = None,
    profile: EnergyProfile | None = None,
    clock: Clock | None = None,
    start_in_background: bool = False,
    replica_source: ReplicaSource | None = None,
) -> web.Application:
    """``replica_source``: where replicas that come and go are listed (default: the settings' file or DNS
    name, see ``replica_sources``)."""
    shape = engine.shape if engine is not None else BACKEND_SHAPES[settings.backend.kind]
    profile = profile or load_profile(settings.energy.profile_path(shape))
    _check_profile_shape(profile, shape, settings.backend.kind)
    keys = load_keys(settings.server)
    clock = clock or MonotonicClock()
    meter_factory = meter_factory or _default_meter
    # where every energy account writes; the metrics' model is the engine's once it is built (Runtime)
    receipts = Receipts()
    energy = settings.energy
    metrics = Metrics(
        registry or CollectorRegistry(),
        model="unknown",
        carbon_g_per_kwh=energy.carbon_g_per_kwh,
        price_per_kwh=energy.price_per_kwh,
        currency=energy.currency,
    )

    def open_account(spec: MeterSpec) -> EnergyAccount:
        return EnergyAccount(
            receipts, metrics, profile, lambda reports: meter_factory(spec, profile, clock, reports)
        )

    served: Backend
    accounts: list[EnergyAccount]
    if isinstance(engine, StaticEngine):
        served, accounts = engine, [open_account(MeterSpec(settings))]
    elif isinstance(engine, ContinuousEngine):
        served = build_pool(settings, profile, open_account, engine=engine)
        accounts = [r.account for r in served.replicas]
    elif shape == "static":
        served = create_static_engine(settings, profile)
        accounts = [open_account(MeterSpec(settings))]
    else:
        served = build_pool(settings, profile, open_account)
        accounts = [r.account for r in served.replicas]
    factory = None
    source = replica_source or source_of(settings.backend)
    if source is not None:  # replicas that come and go: each built as the listed ones were

        def factory(listed: ReplicaSettings) -> Replica:
            return make_replica(settings, listed, profile, open_account)

    runtime = Runtime(settings, metrics, receipts, profile, served, accounts, clock, factory, source)
    app = web.Application(middlewares=[_openai_errors], client_max_size=settings.server.max_body_bytes)
    app[RUNTIME], app[KEYS] = runtime, keys
    _warn_if_open(keys.api, settings)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        lag = asyncio.create_task(runtime.watch_loop_lag(), name="ecobatch-loop-lag")
        bring_up = asyncio.create_task(runtime.bring_up(), name="ecobatch-bring-up")
        app[BRING_UP] = bring_up
        if not start_in_background:
            await bring_up
        try:
            yield
        finally:
            for task in (bring_up, lag):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await runtime.drain(settings.server.shutdown_grace_s)
            await runtime.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    if settings.server.metrics_port is None:
        app.router.add_get("/metrics", _metrics)
    app.router.add_get("/ecobatch/batching", _get_batching)
    app.router.add_put("/ecobatch/batching", _put_batching)
    app.router.add_get("/ecobatch/energy/{request_id}", _get_energy)
    return app


def metrics_app(main: web.Application) -> web.Application:
    """``/metrics`` alone, for ``server.metrics_port``."""
    runtime = main[RUNTIME]

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=_exposition(runtime), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def _warn_if_open(api_keys: Keys, settings: Settings) -> None:  # keys themselves are never logged
    if not api_keys.configured:
        log.warning(
            "no API keys configured: /v1 is open to anyone who can reach %s:%d (set %s or "
            "server.api_keys_file)",
            settings.server.host,
            settings.server.port,
            settings.server.api_keys_env or "server.api_keys_env",
        )

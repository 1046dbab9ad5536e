"""``ecobatch`` command line: ``serve`` runs the proxy; ``calibrate`` measures an energy profile, ``profile``
shows one; ``bench`` loads an OpenAI endpoint; ``tune`` and ``plan`` model settings and capacity."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import __version__
from .config import BACKEND_KINDS, METER_KINDS, Settings, load_settings
from .errors import ConfigError
from .profile import fit_power_law, load_profile
from .serving.routing import ROUTING_POLICIES
from .serving.server import StartupError

__all__ = ["main"]


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible batching proxy")
    p.add_argument("--config", help="YAML settings file (flags override it)")
    p.add_argument("--backend", choices=BACKEND_KINDS, help="engine behind the proxy (default: simulated)")
    p.add_argument("--upstream", help="vllm-http: base URL of the vLLM OpenAI server")
    p.add_argument(
        "--replica",
        action="append",
        metavar="URL",
        help="vllm-http: a vLLM replica (repeat for each; instead of --upstream); energy per replica: config",
    )
    p.add_argument(
        "--routing", choices=ROUTING_POLICIES, help="several replicas: pack (default) or round-robin"
    )
    p.add_argument("--model", help="vllm-http: upstream model name; vllm-async/hf-bnb: model path or name")
    p.add_argument("--served-model-name", help="model name clients use")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--window-ms",
        type=float,
        help="static engines: upper bound of the batching window (min stays, or = this)",
    )
    p.add_argument("--window-min-ms", type=float, help="static engines: lower bound of the batching window")
    p.add_argument("--max-batch-sequences", type=int, help="static engines: most sequences in one batch")
    p.add_argument(
        "--max-batch-size",
        type=int,
        help=argparse.SUPPRESS,  # renamed: refused with the replacement's name (see config.RENAMED)
    )
    p.add_argument("--max-queue", type=int)
    p.add_argument(
        "--max-prompts-per-request", type=int, help="most prompts (or n choices) in one request (default 64)"
    )
    p.add_argument("--slo-ms", type=float, help="static engines: end-to-end latency objective per request")
    p.add_argument(
        "--interactive-budget-ms",
        type=float,
        help="continuous engines: time to first token interactive requests allow (default 100)",
    )
    p.add_argument(
        "--flex-budget-ms",
        type=float,
        help="continuous engines: time to first token flex requests allow (default 30000)",
    )
    p.add_argument(
        "--tpot-slo-ms",
        type=float,
        help="continuous engines: inter-token latency objective (limits sequences in flight; default none)",
    )
    p.add_argument(
        "--max-inflight-sequences",
        type=int,
        help="continuous engines: hard limit on sequences in flight per replica (default none)",
    )
    p.add_argument(
        "--profile",
        help="energy profile YAML (default: the embedded reference for the engine's shape: static A800 "
        "INT8 seed table, or continuous H200 vLLM bf16 curve)",
    )
    p.add_argument(
        "--energy-meter",
        choices=METER_KINDS,
        help="where joules come from: auto (default), nvml (this host's GPUs), dcgm (dcgm-exporter on the "
        "GPU host), model (the profile, labelled modelled)",
    )
    p.add_argument("--dcgm-url", help="dcgm-exporter /metrics URL on the engine's GPU host")
    p.add_argument("--sim-time-scale", type=float, help="simulated backend: 1 = real time, 0 = instant")
    p.add_argument("--request-timeout-s", type=float)
    p.add_argument("--engine-args", type=_json_object, help='JSON object, e.g. \'{"dtype": "int8"}\'')
    p.add_argument("--log-level", default="INFO", help="DEBUG also prints tracebacks of start-up errors")


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.max_batch_size is not None:
        raise ConfigError(
            "--max-batch-size is no longer a flag: use --max-batch-sequences (static engines: sequences in "
            "one batch), --max-inflight-sequences (continuous engines: a hard limit on sequences in flight) "
            "or --max-prompts-per-request (prompts or n choices in one request)",
            field="--max-batch-size",
        )
    window_min = args.window_min_ms
    if args.window_ms is not None and window_min is None:
        window_min = min(args.window_ms, 50.0)
    overrides = {
        "backend.kind": args.backend or ("vllm-http" if args.replica or args.upstream else None),
        "backend.upstream": args.upstream,
        "backend.replicas": [{"url": url} for url in args.replica] if args.replica else None,
        "backend.routing": args.routing,
        "backend.model": args.model,
        "backend.served_model_name": args.served_model_name,
        "backend.sim_time_scale": args.sim_time_scale,
        "backend.request_timeout_s": args.request_timeout_s,
        "backend.engine_args": args.engine_args,
        "server.host": args.host,
        "server.port": args.port,
        "batching.window_min_ms": window_min,
        "batching.window_max_ms": args.window_ms,
        "batching.max_batch_sequences": args.max_batch_sequences,
        "server.max_prompts_per_request": args.max_prompts_per_request,
        "batching.max_queue": args.max_queue,
        "batching.slo_ms": args.slo_ms,
        "batching.interactive_budget_ms": args.interactive_budget_ms,
        "batching.flex_budget_ms": args.flex_budget_ms,
        "batching.tpot_slo_ms": args.tpot_slo_ms,
        "batching.max_inflight_sequences": args.max_inflight_sequences,
        "energy.profile": args.profile,
        "energy.meter": args.energy_meter,
        "energy.dcgm_url": args.dcgm_url,
    }
    return load_settings(args.config, overrides)


def _serve(args: argparse.Namespace) -> int:
    from .serving.server import WORKERS_WAIT_S, serve

    settings = settings_from_args(args)
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    runner = asyncio.Runner(loop_factory=loop_factory)
    workers = ThreadPoolExecutor(thread_name_prefix="ecobatch-io")  # to_thread calls run here
    runner.get_loop().set_default_executor(workers)
    result = runner.run(serve(settings))
    # A worker thread stuck in the engine (a call that never returns) must not keep the process alive:
    # give the workers WORKERS_WAIT_S to finish, then leave without waiting for them.
    workers.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + WORKERS_WAIT_S
    threads = [t for t in threading.enumerate() if t.name.startswith("ecobatch-io")]
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if result.stuck or any(t.is_alive() for t in threads):
        logging.getLogger(__name__).error("a worker thread is still busy: exiting without waiting for it")
        logging.shutdown()
        os._exit(result.code)
    runner.close()
    return result.code


def _profile(args: argparse.Namespace) -> int:
    profile = load_profile(args.path)
    print(f"{profile.name}  kind={profile.kind}  source={profile.source}  gpu={profile.gpu}")
    print(f"  model={profile.model}  quantization={profile.quantization}  engine={profile.engine}")
    if profile.source != "measured":
        print(f"  NOTE: {profile.source} profile, not measured on this machine")
    size = "batch" if profile.kind == "static" else "in flight"
    print(f"{size:>9} {'tok/s':>10} {'J/1k tok':>10} {'power W':>9} {'step ms':>9}")
    for p in profile.points:
        print(
            f"{p.size:>9g} {p.tokens_per_s:>10.1f} {p.joules_per_1k_tokens:>10.1f} "
            f"{p.power_w:>9.1f} {p.step_s * 1000:>9.1f}"
        )
    if len(profile.points) >= 2:
        c, alpha = fit_power_law(profile.points)
        print(f"fit: J/token ≈ {c:.3g} · BS^-{alpha:.2f}")
    return 0


def _bad_value_is_2(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; a bad value (``ValueError``, its message names the option) is one line, exit 2."""
    try:
        return run(args)
    except ValueError as exc:
        print(f"ecobatch {command}: {exc}", file=sys.stderr)
        return 2


def _json_object(text: str) -> dict[str, Any]:
    """``--engine-args``: a JSON object, or an error that says what is wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object like \'{{"dtype": "int8"}}\', got {text!r}')
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecobatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ecobatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    prof = sub.add_parser("profile", help="show an energy profile (validates it)")
    prof.add_argument("path")
    cal = sub.add_parser("calibrate", help="measure this GPU's energy curve and write a profile")
    cal.add_argument("--backend", choices=["hf-bnb", "vllm-http"], default="hf-bnb")
    cal.add_argument(
        "--model", required=True, help="hf-bnb: model directory; vllm-http: the server's base URL"
    )
    cal.add_argument("--model-label", help="model name recorded in the profile (default: --model)")
    cal.add_argument("--dtype", choices=["int8", "bfloat16", "float16"], default="int8")
    cal.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    cal.add_argument("--new-tokens", type=int, default=256)
    cal.add_argument("--prompt-tokens", type=int, default=128)
    cal.add_argument("--min-seconds", type=float, default=5.0, help="timed window per batch size")
    cal.add_argument("--warmup-tokens", type=int, default=16, help="hf-bnb: warm-up run length")
    cal.add_argument(
        "--warmup-s", type=float, default=3.0, help="vllm-http: seconds at load before the window"
    )
    cal.add_argument("--quantization-label", default="as served", help="vllm-http: what the server runs")
    cal.add_argument(
        "--prefill-prompt-tokens",
        type=int,
        default=1024,
        help="vllm-http: prompt length of the prefill point (one output token each)",
    )
    cal.add_argument(
        "--prefill-concurrency",
        type=int,
        default=8,
        help="vllm-http: requests in flight at the prefill point",
    )
    cal.add_argument("--out", required=True, help="PROFILE.yaml (CSV and PNG are written beside it)")
    bench = sub.add_parser(
        "bench",
        help="open-loop load against an ecobatch proxy or a vLLM server (or both, same arrivals)",
        description="Open-loop OpenAI load: the same seeded arrivals to each target; throughput, latency, "
        "TTFT, inter-token latency, errors and energy per target.",
    )
    from .tools.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    tune = sub.add_parser(
        "tune",
        help="what-if: a tier's budget (vLLM) or window and batch size (static) under a p99 SLO (modelled)",
        description="Continuous engines (vLLM): run the proxy's own controller over a sweep of one tier's "
        "budget (batching.interactive_budget_ms or batching.flex_budget_ms) in a model of the engine built "
        "on the energy profile, against vLLM direct; the defaults need no tuning, this shows what another "
        "budget would buy. Static engines: sweep the window and the batch size. Recommends the setting with "
        "the fewest J/request whose interactive p99 meets the SLO (all figures modelled).",
    )
    from .tools.tune import add_arguments as add_tune_arguments

    add_tune_arguments(tune)
    plan = sub.add_parser(
        "plan",
        help="GPUs, kWh, cost and CO2 per month for a request volume (a steady-state model on profiles)",
        description="For one or more energy profiles and a request volume: GPUs needed at the SLO, the "
        "energy-optimal operating point, VRAM, kWh, cost and CO2 per month, and the saving against serving "
        "one sequence at a time.",
    )
    from .tools.plan import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    args = parser.parse_args(argv)
    args.command_line = "ecobatch " + " ".join(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "calibrate":
            from .tools.calibrate import run_cli

            return run_cli(args)
        if args.command == "plan":
            from .tools.plan import run_cli as run_plan

            return _bad_value_is_2("plan", run_plan, args)
        if args.command == "tune":
            from .tools.tune import run_cli as run_tune

            return _bad_value_is_2("tune", run_tune, args)
        if args.command == "bench":
            from .tools.bench import run_cli as run_bench

            return _bad_value_is_2("bench", run_bench, args)
        return _serve(args) if args.command == "serve" else _profile(args)
    except (ConfigError, StartupError) as exc:
        if getattr(args, "log_level", "INFO").upper() == "DEBUG":
            traceback.print_exc()
        kind = "configuration error" if isinstance(exc, ConfigError) else "cannot start"
        print(f"ecobatch: {kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

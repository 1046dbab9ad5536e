"""Proxy overhead: what ecobatch itself costs per request, measured by a load tool that is not ecobatch's.

ecobatch serves the simulated backend at ``--sim-time-scale 0`` (the engine answers at once), so
everything measured is the proxy: HTTP, parsing, the queue and the policy, the batch, the energy ledger,
Prometheus metrics, the response. The load comes from ``wrk`` (``apt install wrk``), which posts
``{"prompt": "hello world", "max_tokens": 4}`` to ``/v1/completions``.

Two targets, each a single process pinned to one core (``taskset``; wrk gets the other core):

* ``ecobatch``: ``ecobatch serve --sim-time-scale 0``, with the default window (50–100 ms) and with the
  window off (``--window-ms 0 --window-min-ms 0``, so that all latency is overhead);
* ``floor``: a bare aiohttp handler that parses the same body and answers a same-sized JSON: the cost of
  the HTTP stack alone on this machine. "Added" latency is ecobatch's minus the floor's at the same
  percentile.

Scenarios: ``saturation`` (256 connections, as fast as they go), ``closed-1`` (one connection, as fast
as it goes), ``low-load`` (one connection, a request every 10 ms: about 90 requests/s).
Optionally (``--profile``, needs py-spy) a sampling profile of ecobatch under saturation, summarised
by module.

    python benchmarks/overhead.py --profile             # ~6 minutes
    python benchmarks/overhead.py --duration-s 5 --out /tmp/overhead.json

Writes ``--out`` (JSON, by default the committed result), a Markdown table and a PNG beside it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
#: what wrk posts: (path, body) per --api
REQUESTS = {
    "completions": ("/v1/completions", '{"prompt": "hello world", "max_tokens": 4}'),
    "chat": (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}',
    ),
}
PATH, BODY = REQUESTS["completions"]
#: one core for the server, the other for wrk (--unpinned: both share both cores, as in production)
PIN = True
PERCENTILES = (50, 90, 99, 99.9)
SCENARIOS = {  # name: (connections, delay between a connection's requests in ms)
    "saturation": (256, 0),
    "closed-1": (1, 0),
    "low-load": (1, 10),
}
_LUA = """
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
%(delay)s
done = function(summary, latency, requests)
  local out = {}
  for _, p in ipairs({%(percentiles)s}) do
    table.insert(out, string.format('"p%%s": %%.1f', p, latency:percentile(p)))
  end
  io.write(string.format('WRK_JSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "non_2xx": %%d, '
    .. '"max_us": %%.1f, %%s}\\n', summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency.max, table.concat(out, ", ")))
end
"""


# ---- the floor: the HTTP stack alone -------------------------------------------------------------
def run_floor_server(port: int) -> None:
    import asyncio

    import msgspec
    from aiohttp import web

    answer = {
        "id": "cmpl-0123456789abcdef0123456789abcdef",
        "object": "text_completion",
        "created": 0,
        "model": "mistral-7b-int8-sim",
        "choices": [
            {"index": 0, "text": " lorem ipsum dolor sit", "logprobs": None, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
    }

    async def completions(request: web.Request) -> web.Response:
        msgspec.json.decode(await request.read())
        return web.Response(body=msgspec.json.encode(answer), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)  # the same-sized answer: only HTTP counts
    app.router.add_get("/health", health)
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=runner.get_loop())


# ---- measuring -----------------------------------------------------------------------------------
def _pinned(args: list[str], cpu: int) -> list[str]:
    """``args`` run on core ``cpu`` where taskset and a second core exist (and PIN is on)."""
    if not PIN or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return args
    return ["taskset", "-c", str(cpu), *args]


def wrk(url: str, connections: int, delay_ms: int, duration_s: float, lua_dir: Path) -> dict[str, Any]:
    script = lua_dir / f"post-{delay_ms}.lua"
    script.write_text(
        _LUA
        % {
            "body": BODY,
            "delay": f"function delay() return {delay_ms} end" if delay_ms else "",
            "percentiles": ", ".join(str(p) for p in PERCENTILES),
        }
    )
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "-s", str(script), f"{url}{PATH}"]
    out = subprocess.run(_pinned(cmd, 1), capture_output=True, text=True, check=True).stdout
    match = re.search(r"^WRK_JSON (.*)$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / seconds, 1),
        "errors": raw["errors"],
        "non_2xx": raw["non_2xx"],
        "latency_ms": {f"p{p:g}": round(raw[f"p{p:g}"] / 1000, 3) for p in PERCENTILES}
        | {"max": round(raw["max_us"] / 1000, 3)},
    }


def profile(pid: int, url: str, duration_s: float, lua_dir: Path) -> dict[str, float]:
    """py-spy under saturation: the share of samples in which each module is on the stack."""
    raw = lua_dir / "profile.txt"
    load = subprocess.Popen(
        _pinned(
            [
                "wrk",
                "-t1",
                "-c256",
                f"-d{duration_s + 2:g}s",
                "-s",
                str(lua_dir / "post-0.lua"),
                f"{url}{PATH}",
            ],
            1,
        ),
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1)
    subprocess.run(
        [
            "py-spy",
            "record",
            "-p",
            str(pid),
            "-d",
            f"{duration_s:g}",
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(raw),
        ],
        capture_output=True,
        check=True,
    )
    load.wait()
    total, by_module = 0, collections.Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        modules = {m.group(1) for m in re.finditer(r"\(([^():]+?)\.py:\d+\)", stack)}
        for module in modules:
            by_module[_short(module)] += n
    return {module: round(100 * n / total, 1) for module, n in by_module.most_common(25)}


def _short(module: str) -> str:
    for marker in ("site-packages/", "ecobatch/", "lib/python3"):
        if marker in module:
            module = module.split(marker, 1)[1]
            return ("ecobatch/" + module) if marker == "ecobatch/" else module
    return module


def _start(name: str, args: list[str], port: int, logs: Path) -> Any:
    from ecobatch.testing.servers import Proc, wait_healthy

    proc = Proc(name, _pinned(args, 0), dict(os.environ, PYTHONUNBUFFERED="1"), logs, port)
    wait_healthy([proc], timeout_s=60)
    return proc


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of repeated runs, figure by figure (requests/s and each percentile separately)."""

    def mid(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {
        "requests": sum(r["requests"] for r in runs),
        "requests_per_s": mid([r["requests_per_s"] for r in runs]),
        "errors": sum(r["errors"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "latency_ms": {k: mid([r["latency_ms"][k] for r in runs]) for k in runs[0]["latency_ms"]},
        "runs": runs,
    }


def measure(duration_s: float, repeats: int, with_profile: bool) -> dict[str, Any]:
    from ecobatch.testing.servers import free_port

    serve = [sys.executable, "-m", "ecobatch.cli", "serve", "--sim-time-scale", "0", "--log-level", "WARNING"]
    targets: dict[str, list[str]] = {
        "floor (bare aiohttp)": [sys.executable, __file__, "--floor-server"],
        "ecobatch, window off": [*serve, "--window-ms", "0", "--window-min-ms", "0"],
        "ecobatch, default window": serve,
    }
    results: dict[str, Any] = {}
    profiled: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        for name, args in targets.items():
            port = free_port()
            proc = _start(name.split(" ")[0], [*args, "--port", str(port)], port, logs)
            try:
                wrk(proc.url, 16, 0, 2, logs)  # warm-up
                time.sleep(1)
                results[name] = {}
                for scenario, (connections, delay_ms) in SCENARIOS.items():
                    runs = []
                    for _ in range(repeats):
                        runs.append(wrk(proc.url, connections, delay_ms, duration_s, logs))
                        time.sleep(1)  # let closed connections drain before the next run
                    results[name][scenario] = median_run(runs)
                    print(name, scenario, {k: v for k, v in results[name][scenario].items() if k != "runs"})
                if with_profile and name == "ecobatch, window off":
                    profiled = profile(proc.proc.pid, proc.url, duration_s, logs)
            finally:
                proc.stop()
    floor = results["floor (bare aiohttp)"]
    added = {
        name: {
            scenario: {
                p: round(results[name][scenario]["latency_ms"][p] - floor[scenario]["latency_ms"][p], 3)
                for p in ("p50", "p99")
            }
            for scenario in ("closed-1", "low-load")
        }
        for name in results
        if name == "ecobatch, window off"  # with a window, latency is the window's by design
    }
    return {"results": results, "added_latency_ms_vs_floor": added, "profile_saturation_pct": profiled}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Proxy overhead ({report['date']}, {report['machine']})",
        "",
        f"Command: `{report['command']}`. Load: wrk, {report['duration_s']:g} s per run, median of "
        f"{report['repeats']} runs per row, body `{report.get('body', BODY)}`; each server one process, "
        + (
            "pinned to one core, wrk on the other."
            if report.get("pinned", True)
            else "not pinned: it and wrk share both cores, as a user's machine would."
        ),
        "",
        "| target | scenario | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, scenarios in report["results"].items():
        for scenario, r in scenarios.items():
            lat = r["latency_ms"]
            lines.append(
                f"| {name} | {scenario} | {r['requests_per_s']:,.0f} | {lat['p50']:.3f} | {lat['p90']:.3f} | "
                f"{lat['p99']:.3f} | {lat['p99.9']:.3f} | {r['errors'] + r['non_2xx']} |"
            )
    lines += [
        "",
        "With the default window a lone request waits for its window (50–100 ms, adaptive; here ~53 ms): "
        "that is batching, not overhead. The overhead is the window-off rows: latency ecobatch adds over "
        "the bare HTTP stack (same percentile, ms):",
        "",
    ]
    lines += ["| target | scenario | p50 | p99 |", "|---|---|---:|---:|"]
    for name, scenarios in report["added_latency_ms_vs_floor"].items():
        for scenario, a in scenarios.items():
            lines.append(f"| {name} | {scenario} | {a['p50']:.3f} | {a['p99']:.3f} |")
    if report["profile_saturation_pct"]:
        lines += [
            "",
            "Where the time goes (window off, saturation; % of py-spy samples with the module on the stack):",
            "",
        ]
        lines += ["| module | % |", "|---|---:|"]
        lines += [f"| {m} | {p} |" for m, p in report["profile_saturation_pct"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [report["results"][n]["saturation"]["requests_per_s"] for n in names], color="#4c72b0")
    axes[0].set_title("saturation (256 connections): requests/s")
    for axis, scenario in zip(axes[1:], ("closed-1", "low-load"), strict=True):
        for offset, p in ((-0.2, "p50"), (0.2, "p99")):
            axis.bar(
                [i + offset for i in range(len(names))],
                [report["results"][n][scenario]["latency_ms"][p] for n in names],
                width=0.4,
                label=p,
            )
        axis.set_xticks(range(len(names)), names)
        axis.set_title(f"{scenario}: latency, ms")
        axis.legend()
    for axis in axes:
        axis.tick_params(axis="x", labelsize=7)
        axis.grid(True, axis="y", alpha=0.3)
    fig.suptitle("ecobatch overhead: simulated backend at --sim-time-scale 0, load from wrk")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--profile", action="store_true", help="also profile ecobatch with py-spy")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="no taskset: server and wrk share both cores, as in production",
    )
    parser.add_argument("--api", choices=sorted(REQUESTS), default="completions", help="what wrk posts")
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PIN, PATH, BODY
    PIN = not args.unpinned
    PATH, BODY = REQUESTS[args.api]
    if args.floor_server:
        run_floor_server(args.port)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt install wrk)")
    if args.profile and shutil.which("py-spy") is None:
        sys.exit("--profile needs py-spy (pip install py-spy)")
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "command": "python benchmarks/overhead.py"
        + (" --profile" if args.profile else "")
        + (" --unpinned" if args.unpinned else "")
        + (f" --api {args.api}" if args.api != "completions" else "")
        + (f" --out {args.out}" if args.out != RESULTS / "overhead.json" else "")
        + (
            ""
            if args.repeats == 3 and args.duration_s == 10
            else f" --repeats {args.repeats} --duration-s {args.duration_s:g}"
        ),
        "duration_s": args.duration_s,
        "repeats": args.repeats,
        "pinned": PIN,
        "body": BODY,
        **measure(args.duration_s, args.repeats, args.profile),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    try:
        plot(report, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install -e '.[bench]')")
    print(markdown(report))


if __name__ == "__main__":
    main()

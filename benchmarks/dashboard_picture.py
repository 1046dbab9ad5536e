"""A picture of the Grafana dashboard for the docs, drawn with matplotlib (Grafana is not installable here).

Starts ecobatch on the simulated backend at real time (``--sim-time-scale 1``) on the H200 bf16 static
profile, so every joule is MODELLED from that profile (``source="model"``), and a Prometheus (the
distribution's binary, as in the deploy tests) scraping it every second with the rules of
``deploy/prometheus/rules``, their 5-minute windows shortened to 15 s so that a run of under two
minutes fills them. It drives a load in phases (Poisson arrivals, then a burst past the queue, then
idle), asks Prometheus for every expression of every panel of ``deploy/grafana/dashboards/ecobatch.json``
over the run (Grafana's ``$__rate_interval`` as 15 s), and draws the panels in the dashboard's order.

    python benchmarks/dashboard_picture.py    # ~2 minutes; needs `prometheus` on PATH and matplotlib

Writes ``benchmarks/results/dashboard-simulated.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from ecobatch.testing.servers import engine_env, start_prometheus, start_proxy

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ecobatch.json"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "ecobatch.rules.yml"
CPU_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus-cpu.yml"
PROFILE = ROOT / "configs" / "profiles" / "h200-mistral7b-bf16.yaml"
OUT = ROOT / "benchmarks" / "results" / "dashboard-simulated.png"

WINDOW = "15s"  # replaces the rules' [5m] and Grafana's $__rate_interval
MAX_QUEUE = 64  # so that the burst is shed with 429
# (label, seconds, arrivals per second); two bursts of BURST requests at once follow the second phase
PHASES = [("2 req/s", 15.0, 2.0), ("10 req/s", 20.0, 10.0)]
BURST = 300
BURST_GAP_S = 8.0
TAIL = [("idle", 15.0, 0.0), ("4 req/s", 12.0, 4.0)]
OUTPUT_TOKENS = (16, 32, 64, 128)
MODEL = "mistral-7b-bf16-sim"

UNITS = {
    "joule": "J",
    "watt": "W",
    "percentunit": "share (0-1)",
    "s": "s",
    "reqps": "requests/s",
    "ops": "decisions/s",
    "massg": "g",
    "short": "",
    "none": "",
}


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def _wait(what: str, ok: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s} s")
        time.sleep(0.2)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _scraped(url: str) -> bool:
    q = urllib.parse.urlencode({"query": 'up{job="ecobatch"} == 1'})
    try:
        return bool(_get_json(f"{url}/api/v1/query?{q}")["data"]["result"])
    except OSError:
        return False


async def _request(
    session: aiohttp.ClientSession, url: str, rng: random.Random, statuses: Counter[int]
) -> None:
    stream = rng.random() < 0.25
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Tell me about batching."}],
        "max_tokens": rng.choice(OUTPUT_TOKENS),
        "stream": stream,
    }
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as r:
            await r.read()
            statuses[r.status] += 1
    except aiohttp.ClientError:
        statuses[0] += 1


async def _drive(url: str, seed: int, marks: list[tuple[str, float, float]]) -> Counter[int]:
    """Open-loop Poisson arrivals per phase (never waiting for answers); ``marks`` gets each phase's
    (label, start, end) in wall-clock seconds."""
    rng = random.Random(seed)
    statuses: Counter[int] = Counter()
    tasks: set[asyncio.Task[None]] = set()

    def send(session: aiohttp.ClientSession) -> None:
        task = asyncio.create_task(_request(session, url, rng, statuses))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def phase(session: aiohttp.ClientSession, label: str, seconds: float, rate: float) -> None:
        start = time.time()
        end = start + seconds
        while rate > 0:
            await asyncio.sleep(rng.expovariate(rate))
            if time.time() >= end:
                break
            send(session)
        await asyncio.sleep(max(0.0, end - time.time()))
        marks.append((label, start, time.time()))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for label, seconds, rate in PHASES:
            await phase(session, label, seconds, rate)
        for n in (1, 2):
            start = time.time()
            for _ in range(BURST):
                send(session)
            await asyncio.sleep(BURST_GAP_S)
            marks.append((f"burst {n} ({BURST})", start, time.time()))
        for label, seconds, rate in TAIL:
            await phase(session, label, seconds, rate)
        if tasks:
            await asyncio.wait(set(tasks), timeout=30)
    return statuses


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def _grafana_to_promql(expr: str) -> str:
    return re.sub(r"\$__\w+|\$\{__\w+\}", WINDOW, expr)


def query_panels(prometheus: str, start: float, end: float) -> list[dict[str, Any]]:
    """Each panel of the dashboard with its targets' series over [start, end] (1 s steps)."""
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    for panel in panels:
        for target in panel["targets"]:
            expr = _grafana_to_promql(target["expr"])
            if panel["type"] == "stat":
                q = urllib.parse.urlencode({"query": expr, "time": end})
                body = _get_json(f"{prometheus}/api/v1/query?{q}")
            else:
                q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 1})
                body = _get_json(f"{prometheus}/api/v1/query_range?{q}")
            if body["status"] != "success":
                raise RuntimeError(f"{panel['title']}: {expr}: {body.get('error')}")
            target["series"] = [
                (_legend(target["legendFormat"], s["metric"]), s.get("values") or [s["value"]])
                for s in body["data"]["result"]
            ]
    return panels


def draw(
    panels: list[dict[str, Any]], marks: list[tuple[str, float, float]], subtitle: str, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = [p for p in panels if p["type"] != "stat"]
    stats = [p for p in panels if p["type"] == "stat"]
    cols = 3
    rows = -(-len(charts) // cols) + 1
    fig = plt.figure(figsize=(21, 3.6 * rows))
    grid = fig.add_gridspec(rows, cols, height_ratios=[0.35] + [1.0] * (rows - 1))
    t0 = marks[0][1]
    end_s = marks[-1][2] - t0
    header = fig.add_subplot(grid[0, :])
    header.axis("off")
    lines = [
        f"{t['legendFormat'].split(':')[0]}: " + ", ".join(name.split(": ", 1)[-1] for name, _ in t["series"])
        for p in stats
        for t in p["targets"]
    ]
    header.text(0.0, 0.5, "\n".join(lines), fontsize=12, va="center", family="monospace")
    phases = "   ".join(f"{label}: {s - t0:.0f}-{e - t0:.0f} s" for label, s, e in marks)
    header.text(1.0, 0.5, "load phases\n" + phases, fontsize=11, va="center", ha="right")
    for i, panel in enumerate(charts):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        stacked = (
            panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode") == "normal"
        )
        drawn = 0
        series = [(name, values) for t in panel["targets"] for name, values in t["series"]]
        if stacked and series:
            xs = sorted({float(ts) for _, values in series for ts, _v in values})
            ys = [
                [dict((float(ts), float(v)) for ts, v in values).get(x, 0.0) for x in xs]
                for _, values in series
            ]
            ax.stackplot([x - t0 for x in xs], ys, labels=[name for name, _ in series], alpha=0.7)
            drawn = len(series)
        else:
            for name, values in series:
                ax.plot(
                    [float(ts) - t0 for ts, _ in values], [float(v) for _, v in values], label=name, lw=1.2
                )
                drawn += 1
        for _label, s, _e in marks[1:]:
            ax.axvline(s - t0, color="grey", lw=0.6, ls="--")
        ax.set_xlim(0, end_s)
        ax.set_title(panel["title"], fontsize=11)
        ax.set_ylabel(UNITS.get(panel["fieldConfig"]["defaults"].get("unit", ""), ""))
        ax.set_xlabel("s since the load started", fontsize=8)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(
                0.5,
                0.5,
                "no data: the simulated stack has\nno vLLM server or dcgm-exporter",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
    fig.suptitle(
        "ecobatch dashboard panels - drawn with matplotlib from a simulated run's metrics, not Grafana; "
        "energy MODELLED",
        fontsize=15,
        y=0.995,
    )
    fig.text(0.5, 0.975, subtitle, ha="center", va="top", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("prometheus") is None:
        raise SystemExit("prometheus is not on PATH: bash scripts/install-prometheus.sh")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        proxy_args = ["--sim-time-scale", "1", "--profile", str(PROFILE), "--max-queue", str(MAX_QUEUE)]
        proxy_args += ["--served-model-name", MODEL]
        ecobatch = start_proxy(proxy_args, tmp, name="ecobatch", env=engine_env())
        (tmp / "rules").mkdir()
        (tmp / "rules" / RULES.name).write_text(RULES.read_text().replace("[5m]", f"[{WINDOW}]"))
        config = yaml.safe_load(CPU_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(tmp / "rules" / "*.rules.yml")]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{ecobatch.port}"]}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus, url = start_prometheus(tmp / "prometheus.yml", tmp)
        try:
            _wait("ecobatch /health", ecobatch.healthy, 60)
            _wait("Prometheus /-/ready", lambda: _ready(url), 30)
            _wait("the first scrape", lambda: _scraped(url), 30)
            marks: list[tuple[str, float, float]] = []
            statuses = asyncio.run(_drive(ecobatch.url, args.seed, marks))
            time.sleep(3)  # the last requests settle and are scraped
            panels = query_panels(url, marks[0][1], time.time())
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=10)
            ecobatch.stop()
    answered = ", ".join(f"{n} x {code}" for code, n in sorted(statuses.items()))
    subtitle = (
        f"ecobatch --backend simulated --sim-time-scale 1 --profile {PROFILE.relative_to(ROOT)} "
        f"--max-queue {MAX_QUEUE}: the profile was measured on an H200, here it is the model "
        '(every energy series source="model").\n'
        f"Open-loop Poisson load, {OUTPUT_TOKENS} output tokens, 1 in 4 streamed; answers: {answered}. "
        f"Prometheus scrapes every 1 s; rates over {WINDOW} windows (the dashboard: 5-minute recording "
        "rules and Grafana's $__rate_interval).\n"
        "Burst 1's 429s are missing from the rates: ecobatch creates a status's series on its first "
        "answer, so Prometheus first sees the 429 counter already at its burst total; burst 2's show."
    )
    draw(panels, marks, subtitle, args.out)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} ({answered})")


if __name__ == "__main__":
    main()

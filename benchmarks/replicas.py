"""Pack vs round-robin over two vLLM replicas: the same seeded Poisson arrivals at each rate go to an
ecobatch routing ``pack`` and to one routing ``round-robin`` (same gate settings, same replicas), and
the GPUs' energy counter is read over each phase, idle included (both GPUs).

Two modes:

* without ``--replica`` (runs anywhere): the replicas are MODELLED vLLM servers
  (``ecobatch.testing.sim_vllm``: speed and power from the H200 reference profile) and their GPUs'
  energy is a modelled dcgm-style counter. Every figure it writes is labelled MODELLED (the targets'
  labels, the summary, the plots).
* ``--replica URL --replica URL --energy nvml``: real vLLM servers on this host's GPUs (replica i on
  GPU i), energy from NVML.

    python benchmarks/replicas.py --rates 1,2,4,8 --duration 60 --out /tmp/replicas

Rows of an earlier run in the same ``--out`` folder are kept for the rates not run again.

Writes ``summary.json``, ``summary.csv``, ``replicas.png`` and each rate's bench report to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ecobatch.testing.servers import Proc, engine_env, free_port, start_proxy, wait_healthy


def proxy_config(
    replicas: list[str], routing: str, energy: dict[str, Any], path: Path, profile: str | None
) -> Path:
    config = {
        "backend": {
            "kind": "vllm-http",
            "replicas": [
                {
                    "url": url,
                    **({"dcgm_labels": {"gpu": str(i)}} if "dcgm_url" in energy else {"gpu_indices": [i]}),
                }
                for i, url in enumerate(replicas)
            ],
            "routing": routing,
        },
        "energy": {**energy, **({"profile": str(Path(profile).resolve())} if profile else {})},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="ecobatch-replicas-"))
    procs: list[Proc] = []
    try:
        if args.replica:
            replicas, energy_flag = args.replica, args.energy
            energy: dict[str, Any] = {"meter": args.proxy_meter}
        else:
            port, dcgm_port = free_port(), free_port()
            while port + 1 == dcgm_port:
                dcgm_port = free_port()
            cmd = [sys.executable, "-m", "ecobatch.testing.sim_vllm", "--replicas", "2", "--port", str(port)]
            cmd += ["--dcgm-port", str(dcgm_port), "--served-model-name", "sim"]
            sim = Proc("sim-vllm", cmd, engine_env(), logs, port)
            procs.append(sim)
            replicas = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
            dcgm = f"http://127.0.0.1:{dcgm_port}/metrics"
            energy, energy_flag = {"dcgm_url": dcgm}, f"dcgm={dcgm}"
            deadline = time.monotonic() + 30
            while "MODELLED" not in sim.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
        proxies = {}
        for routing in ("pack", "round-robin"):
            config = proxy_config(replicas, routing, energy, logs / f"{routing}.yaml", args.profile)
            proxies[routing] = start_proxy(["--config", str(config)], logs, name=f"ecobatch-{routing}")
            procs.append(proxies[routing])
        wait_healthy(list(proxies.values()), timeout_s=120)
        rows = []
        for rate in args.rates:
            report = out / f"rate-{rate:g}.json"
            bench = [
                sys.executable, "-m", "ecobatch.cli", "bench",
                "--url", proxies["pack"].url, "--label", "pack",
                "--compare", proxies["round-robin"].url, "--label", "round-robin",
                "--api", "completions", "--rate", f"{rate:g}", "--duration", f"{args.duration:g}",
                "--seed", str(args.seed), "--energy", energy_flag, "--cooldown-s", "3", "--quiet",
                "--out", str(report),
            ]  # fmt: skip
            if not args.replica:  # each target's label says so, in every report and plot
                bench[bench.index("pack")] = "pack (MODELLED)"
                bench[bench.index("round-robin")] = "round-robin (MODELLED)"
            print("$", shlex.join(["ecobatch", *bench[3:]]), flush=True)
            subprocess.run(bench, check=True)
            pack, rr = json.loads(report.read_text())["targets"]
            rows.append(row(rate, pack, rr))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for proc in procs:
            proc.stop()
    path = out / "summary.json"
    if path.exists():  # an earlier run into the same folder: keep its other rates
        earlier = json.loads(path.read_text())["rows"]
        rows = sorted(
            [r for r in earlier if r["rate_per_s"] not in args.rates] + rows, key=lambda r: r["rate_per_s"]
        )
    summary = {
        "what": "MODELLED: two simulated vLLM replicas (ecobatch.testing.sim_vllm, H200 reference profile)"
        if not args.replica
        else f"measured: vLLM replicas {args.replica}, energy {args.energy}",
        "command": shlex.join([sys.argv[0], *sys.argv[1:]]),
        "duration_s": args.duration,
        "seed": args.seed,
        "rows": rows,
    }
    path.write_text(json.dumps(summary, indent=1))
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(summary, out / "replicas.png")
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def row(rate: float, pack: dict[str, Any], rr: dict[str, Any]) -> dict[str, Any]:
    """One rate's comparison from the two targets' bench summaries (energy None where not read)."""
    j_pack, j_rr = pack["energy"].get("joules_per_request"), rr["energy"].get("joules_per_request")
    return {
        "what": "modelled" if "MODELLED" in pack["label"] else "measured",
        "rate_per_s": rate,
        "requests": pack["requests"],
        "ok_pack": pack["ok"],
        "ok_round_robin": rr["ok"],
        "j_per_request_pack": j_pack,
        "j_per_request_round_robin": j_rr,
        "j_ratio": _ratio(j_pack, j_rr),
        "p99_s_pack": pack["latency_s"]["p99"],
        "p99_s_round_robin": rr["latency_s"]["p99"],
        "p99_ratio": _ratio(pack["latency_s"]["p99"], rr["latency_s"]["p99"]),
        "mean_power_w_pack": pack["energy"].get("mean_power_w"),
        "mean_power_w_round_robin": rr["energy"].get("mean_power_w"),
        "ecobatch_j_per_request_with_idle_pack": pack["energy"]
        .get("ecobatch", {})
        .get("joules_per_request_with_idle"),
        "ecobatch_j_per_request_with_idle_round_robin": rr["energy"]
        .get("ecobatch", {})
        .get("joules_per_request_with_idle"),
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["j_per_request_pack"] is not None]  # energy read
    rates = [r["rate_per_s"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rates, [r["j_per_request_pack"] for r in rows], "o-", label="pack")
    ax1.plot(rates, [r["j_per_request_round_robin"] for r in rows], "s--", label="round-robin")
    ax1.set_xlabel("arrival rate (req/s)")
    ax1.set_ylabel("J/request, both GPUs, idle included")
    ax1.legend()
    ax2.plot(rates, [r["p99_s_pack"] for r in rows], "o-", label="pack")
    ax2.plot(rates, [r["p99_s_round_robin"] for r in rows], "s--", label="round-robin")
    ax2.set_xlabel("arrival rate (req/s)")
    ax2.set_ylabel("latency p99 (s)")
    ax2.legend()
    fig.suptitle(summary["what"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1,2,4,8", help="requests per second, comma-separated")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per target and rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replica", action="append", default=[], help="a real vLLM server (replica i on GPU i)")
    p.add_argument("--energy", default="nvml", help="with --replica: the bench's energy source")
    p.add_argument("--proxy-meter", default="nvml", help="with --replica: the proxies' energy.meter")
    p.add_argument("--profile", help="the proxies' energy profile (default: the H200 reference)")
    p.add_argument("--out", type=Path, required=True, help="folder for the reports (earlier rows are kept)")
    args = p.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    try:
        import matplotlib  # noqa: F401  (the plots; checked before minutes of load, not after)
    except ImportError:
        sys.exit("benchmarks/replicas.py needs matplotlib: pip install matplotlib (or 'ecobatch[bench]')")
    summary = run(args)
    print(summary["what"])
    for r in summary["rows"]:
        j = (
            "—"
            if r["j_ratio"] is None
            else f"{r['j_per_request_pack']:.1f} vs {r['j_per_request_round_robin']:.1f} J"
        )
        ratio = "" if r["j_ratio"] is None else f" ({r['j_ratio']:.2f}x)"
        print(
            f"{r['rate_per_s']:>5g} req/s  J/request pack vs round-robin: {j}{ratio}; "
            f"p99 {r['p99_s_pack']:.2f} vs {r['p99_s_round_robin']:.2f} s ({r['p99_ratio']:.2f}x)"
        )


if __name__ == "__main__":
    main()

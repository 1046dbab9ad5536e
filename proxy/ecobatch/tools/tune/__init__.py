"""``ecobatch tune``: what a setting buys for a workload, from a simulation (a **model**).

Continuous engines (vLLM): ecobatch's run-time controller needs no offline tuning (its defaults, with a
calibrated profile, are the recommended production setting). ``tune`` is the what-if tool: it runs the
**same** controller (``release.plan_releases``) in ``sim``'s engine model over a sweep of one tier's
budget (``--tier interactive``: ``batching.interactive_budget_ms``; ``--tier flex``:
``batching.flex_budget_ms``) for a workload (``--rate``, lengths, ``--flex-share``) and shows J/request
and latency against vLLM direct (everything sent at once).

Static engines (HF, simulated): it sweeps the window and the batch size through the batcher's own rule.

The recommendation is the setting that spends the fewest joules per request while the p99 latency of
the interactive requests meets the SLO (``--slo-p99-s``, or ``--slo-p99-x-baseline``: a multiple of the
baseline's modelled p99). It prints a table, the ``PUT /ecobatch/batching`` body (and YAML) that applies
it, and writes JSON and a PNG. ``--live URL`` then applies it to a running ecobatch, sends it the first
seed's arrivals with ``ecobatch bench`` and reports the model's error on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...config import DEFAULT_PROFILES, BatchingSettings, build_section
from ...profile import EnergyProfile, load_profile
from ..bench.workload import Arrival, parse_lengths, poisson, read_trace, with_tiers
from .sim import (
    BatcherRule,
    Controller,
    Result,
    SendAtOnce,
    same_window,
    simulate_continuous,
    simulate_static,
)

__all__ = ["Candidate", "add_arguments", "run_cli", "sweep"]

#: budgets tried per tier when --budgets-ms is not given
DEFAULT_BUDGETS_MS = {
    "interactive": "0,50,100,250,500,1000,2000,4000",
    "flex": "0,2000,5000,10000,15000,30000,60000",
}


@dataclass(frozen=True, slots=True)
class Candidate:
    #: the batching settings it stands for (the PUT /ecobatch/batching body, without the SLO)
    settings: dict[str, Any]
    label: str
    joules_per_request: float
    p50_s: float
    #: the p99 end-to-end latency of the interactive (and priority) requests
    p99_s: float
    #: flex requests: the longest wait before release (0: none was flex)
    flex_max_wait_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, slo_p99_s: float) -> dict[str, Any]:
        """The batching settings that apply this candidate; a static one carries the SLO it was chosen
        under as the server's latency objective."""
        if "window_max_ms" in self.settings:
            return {**self.settings, "slo_ms": round(slo_p99_s * 1000.0, 1)}
        return dict(self.settings)


def _interactive_p99(result: Result) -> float:
    latencies = [x for x, t in zip(result.latencies_s, result.tiers, strict=True) if t != "flex"]
    latencies = latencies or list(result.latencies_s)
    if len(latencies) < 2:
        return latencies[0] if latencies else 0.0
    return statistics.quantiles(latencies, n=100, method="inclusive")[98]


def _summarise(
    results: list[Result], joules_per_request: list[float], settings: dict[str, Any], label: str
) -> Candidate:
    return Candidate(
        settings,
        label,
        statistics.fmean(joules_per_request),
        statistics.fmean(r.p50_s for r in results),
        statistics.fmean(_interactive_p99(r) if r.tiers else r.p99_s for r in results),
        max((r.max_wait_s("flex") for r in results if r.tiers), default=0.0),
    )


def sweep(
    profile: EnergyProfile,
    workloads: list[list[Arrival]],
    *,
    tier: str = "interactive",
    budgets_ms: list[float] | None = None,
    windows_ms: list[float] | None = None,
    sizes: list[int] | None = None,
) -> tuple[list[Candidate], Candidate]:
    """Every setting over the workloads (seeds), and the baseline: continuous engines without ecobatch
    (everything sent at once), static ones per request (batches of 1, no window). On each workload every
    run's joules are counted over the same wall-clock window (until the latest one ends)."""
    settings: list[tuple[dict[str, Any], str, Any]] = []
    if profile.kind == "continuous":
        for budget in budgets_ms or []:
            overrides: dict[str, Any] = {f"{tier}_budget_ms": budget}
            label = f"{tier} budget {budget:g} ms"
            defaults = BatchingSettings()
            if tier == "interactive" and budget > defaults.flex_budget_ms:
                overrides["flex_budget_ms"] = budget  # flex never waits less than interactive
                label += " (flex too)"
            if tier == "flex" and budget < defaults.interactive_budget_ms:
                overrides["interactive_budget_ms"] = budget
                label += " (interactive too)"
            checked = build_section(BatchingSettings, overrides, "batching")  # --budgets-ms: the limits
            settings.append((overrides, label, Controller(checked)))
        base: tuple[dict[str, Any], str, Any] = ({}, "vLLM direct", SendAtOnce())
    else:
        for window_ms in windows_ms or []:
            for size in sizes or []:
                body = {
                    "window_min_ms": window_ms,
                    "window_max_ms": window_ms,
                    "max_batch_sequences": size,
                    "energy_tolerance": 0.0,
                }
                rule = BatcherRule(window_ms / 1000.0, window_ms / 1000.0, size)
                settings.append((body, f"window {window_ms:g} ms, batch {size}", rule))
        base = ({}, "batch 1, no window", BatcherRule(0.0, 0.0, 1))
    runs = [[_run(profile, w, policy) for w in workloads] for _, _, policy in [base, *settings]]
    per_workload = [same_window([run[i] for run in runs]) for i in range(len(workloads))]
    summaries = [
        _summarise(results, [jpr[k] for jpr in per_workload], body, label)
        for k, ((body, label, _), results) in enumerate(zip([base, *settings], runs, strict=True))
    ]
    return summaries[1:], summaries[0]


def _run(profile: EnergyProfile, workload: list[Arrival], policy: Any) -> Result:
    if isinstance(policy, BatcherRule):
        return simulate_static(profile, workload, policy)
    return simulate_continuous(profile, workload, policy)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, help="energy profile (default: the embedded continuous reference)")
    p.add_argument("--rate", type=float, default=4.0, help="mean requests per second (Poisson)")
    p.add_argument(
        "--trace", type=Path, help="JSONL trace instead of --rate (timestamp, prompt/output tokens)"
    )
    p.add_argument("--output-tokens", default="choice:16,32,64,128,256,512")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of simulated traffic per seed")
    p.add_argument(
        "--seeds", type=int, default=3, help="workloads drawn per setting (their mean is reported)"
    )
    slo = p.add_mutually_exclusive_group(required=True)
    slo.add_argument(
        "--slo-p99-s", type=float, help="the p99 end-to-end latency of interactive requests, in seconds"
    )
    slo.add_argument(
        "--slo-p99-x-baseline",
        type=float,
        help="the p99 to meet as a multiple of the baseline's (everything sent at once; static: batch 1)",
    )
    p.add_argument(
        "--prompt-tokens", default="64", help="prompt lengths (the model ignores prefill; --live sends them)"
    )
    p.add_argument(
        "--tier",
        choices=["interactive", "flex"],
        help="continuous engines: whose budget to sweep (default: flex with --flex-share > 0, else "
        "interactive)",
    )
    p.add_argument("--flex-share", type=float, default=0.0, help="share of requests sent as flex (0-1)")
    p.add_argument(
        "--budgets-ms",
        help="continuous engines: the budgets to try (default: "
        + "; ".join(f"{k}: {v}" for k, v in DEFAULT_BUDGETS_MS.items())
        + ")",
    )
    p.add_argument(
        "--live",
        metavar="URL",
        help="an ecobatch in front of the engine: apply the recommendation there and measure it with bench",
    )
    p.add_argument(
        "--admin-key",
        default=_admin_key_from_env(),
        help="--live: the admin key for PUT /ecobatch/batching (default: $ECOBATCH_ADMIN_KEY, else the "
        "first of $ECOBATCH_ADMIN_KEYS, the variable the server reads)",
    )
    p.add_argument("--api-key", default=os.environ.get("ECOBATCH_API_KEY"), help="--live: an API key")
    p.add_argument("--energy", default="none", help="--live: none, nvml or dcgm=URL (as in bench)")
    p.add_argument(
        "--windows-ms", default="0,100,250,500,1000,2000,4000", help="static engines: windows to try"
    )
    p.add_argument(
        "--sizes",
        help="static engines: batch sizes to try (default: 4,8,…,256 up to the profile's largest point)",
    )
    p.add_argument("--quiet", action="store_true", help="--live: no progress bar")
    p.add_argument("--out", type=Path, help="write a JSON report here (and a PNG beside it)")


def _admin_key_from_env() -> str | None:
    single = os.environ.get("ECOBATCH_ADMIN_KEY")
    several = [k.strip() for k in os.environ.get("ECOBATCH_ADMIN_KEYS", "").split(",") if k.strip()]
    return single or (several[0] if several else None)


def _sizes(arg: str | None, profile: EnergyProfile) -> list[int]:
    """--sizes, or the powers of two from 4 to 256 that the profile covers (beyond its largest point
    the model would extrapolate, and a server caps the batch there anyway)."""
    if arg:
        return [int(x) for x in arg.split(",")]
    largest = max(p.size for p in profile.points)
    return [s for s in (4, 8, 16, 32, 64, 128, 256) if s <= largest] or [int(largest)]


def _workloads(args: argparse.Namespace) -> list[list[Arrival]]:
    if args.trace is not None:
        base = [read_trace(args.trace)]
    else:
        output = parse_lengths(args.output_tokens, "--output-tokens")
        prompt = parse_lengths(args.prompt_tokens, "--prompt-tokens")
        base = [
            poisson(args.rate, prompt, output, duration_s=args.duration, count=None, seed=s)
            for s in range(args.seeds)
        ]
    return [with_tiers(w, flex_share=args.flex_share, tier="interactive", seed=i) for i, w in enumerate(base)]


def _table(candidates: list[Candidate], baseline: Candidate, slo_s: float) -> str:
    lines = [
        f"{'setting':<40} {'J/request':>10} {'vs base':>8} {'p50 s':>7} {'p99 s':>7} "
        f"{'flex wait':>9}  meets SLO"
    ]
    for c in sorted(candidates, key=lambda c: c.joules_per_request):
        ok = "yes" if c.p99_s <= slo_s else "no"
        ratio = c.joules_per_request / baseline.joules_per_request
        lines.append(
            f"{c.label:<40} {c.joules_per_request:>10.1f} {ratio:>8.2f} {c.p50_s:>7.2f} {c.p99_s:>7.2f} "
            f"{c.flex_max_wait_s:>8.1f}s  {ok}"
        )
    return "\n".join(lines)


def _plot(
    candidates: list[Candidate], baseline: Candidate, best: Candidate | None, slo_s: float, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [c.p99_s for c in candidates],
        [c.joules_per_request for c in candidates],
        s=12,
        alpha=0.6,
        label="settings tried",
    )
    ax.scatter([baseline.p99_s], [baseline.joules_per_request], marker="s", color="k", label="baseline")
    if best is not None:
        ax.scatter(
            [best.p99_s], [best.joules_per_request], marker="*", s=160, color="tab:red", label="recommended"
        )
    ax.axvline(slo_s, color="tab:red", linestyle=":", label="p99 SLO")
    ax.set_xlabel("p99 latency, s (modelled)")
    ax.set_ylabel("J per request (modelled)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _candidate_model(profile: EnergyProfile, candidate: Candidate, arrivals: list[Arrival]) -> Result:
    """The engine model of ``candidate`` on ``arrivals`` (for --live's comparison)."""
    if profile.kind == "continuous":
        return simulate_continuous(profile, arrivals, Controller(BatchingSettings(**candidate.settings)))
    s = candidate.settings
    rule = BatcherRule(s["window_min_ms"] / 1000.0, s["window_max_ms"] / 1000.0, s["max_batch_sequences"])
    return simulate_static(profile, arrivals, rule)


def run_cli(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile or DEFAULT_PROFILES["continuous"])
    if not 0 <= args.flex_share <= 1:
        raise ValueError(f"--flex-share={args.flex_share} must be between 0 and 1")
    tier = args.tier or ("flex" if args.flex_share > 0 else "interactive")
    budgets = [float(x) for x in (args.budgets_ms or DEFAULT_BUDGETS_MS[tier]).split(",")]
    workloads = _workloads(args)
    candidates, baseline = sweep(
        profile,
        workloads,
        tier=tier,
        budgets_ms=budgets,
        windows_ms=[float(x) for x in args.windows_ms.split(",")],
        sizes=_sizes(args.sizes, profile),
    )
    if args.slo_p99_s is None:
        span_s = max((w[-1].at_s for w in workloads if w), default=0.0)
        if baseline.p99_s > span_s:  # it fell further behind all along: its p99 is the run's length
            raise ValueError(
                f"--slo-p99-x-baseline: the baseline cannot keep up with this load (its modelled p99, "
                f"{baseline.p99_s:.0f} s, outgrows the {span_s:.0f} s of traffic), so a multiple of it "
                "means nothing: give --slo-p99-s"
            )
        args.slo_p99_s = args.slo_p99_x_baseline * baseline.p99_s
        print(
            f"p99 SLO: {args.slo_p99_x_baseline:g} x the baseline's {baseline.p99_s:.2f} s "
            f"= {args.slo_p99_s:.2f} s"
        )
    feasible = [c for c in candidates if c.p99_s <= args.slo_p99_s]
    best = min(feasible, key=lambda c: c.joules_per_request) if feasible else None
    print(
        f"MODELLED with profile {profile.name} ({profile.kind}, {profile.source}); baseline: "
        f"{'everything sent at once (vLLM direct)' if profile.kind == 'continuous' else 'batch 1, no window'}"
        f" = {baseline.joules_per_request:.1f} J/request, p99 {baseline.p99_s:.2f} s"
    )
    if profile.kind == "continuous":
        print(
            f"ecobatch's run-time controller (the proxy's own decision code), {tier} budget swept; "
            f"flex share {args.flex_share:g}"
        )
    print(_table(candidates, baseline, args.slo_p99_s))
    report: dict[str, Any] = {
        "modelled": True,
        "profile": {"name": profile.name, "kind": profile.kind, "source": profile.source},
        "command": getattr(args, "command_line", None),
        "tier": tier if profile.kind == "continuous" else None,
        "flex_share": args.flex_share,
        "slo_p99_s": args.slo_p99_s,
        "baseline": asdict(baseline),
        "candidates": [asdict(c) for c in candidates],
        "recommended": asdict(best) if best else None,
    }
    if best is None:
        print(f"no setting meets p99 <= {args.slo_p99_s} s; loosen the SLO or add capacity (ecobatch plan)")
    else:
        ratio = best.joules_per_request / baseline.joules_per_request
        print(
            f"\nrecommended: {best.label}: {best.joules_per_request:.1f} J/request ({ratio:.2f}x the "
            f"baseline), p99 {best.p99_s:.2f} s (modelled)"
        )
        body = best.body(args.slo_p99_s)
        print(
            "apply it at run time (ECOBATCH_ADMIN_KEY: one of the server's admin keys):\n"
            "  curl -X PUT http://HOST:PORT/ecobatch/batching "
            "-H \"Authorization: Bearer $ECOBATCH_ADMIN_KEY\" -H 'content-type: application/json' "
            f"-d '{json.dumps(body)}'"
        )
        print(
            "or in the config file:\n  batching:\n" + "".join(f"    {k}: {v}\n" for k, v in body.items()),
            end="",
        )
    if args.live and best is not None:
        report["live"] = asyncio.run(_live(args, profile, best, workloads[0]))
    elif args.live:
        print("--live: nothing to measure, no setting meets the SLO")
    if args.out is None:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    try:
        print(f"wrote {_plot(candidates, baseline, best, args.slo_p99_s, args.out.with_suffix('.png'))}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'ecobatch[bench]')")
    return 0


def _check_same_engine(url: str, health: Any, profile: EnergyProfile) -> None:
    """Refuse to measure a proxy whose engine is not the kind the model ran (a static recommendation on
    a continuous engine, or the reverse, compares nothing); warn when the profiles differ."""
    health = health if isinstance(health, dict) else {}
    scale = health.get("sim_time_scale")
    if scale is not None and scale != 1.0:
        raise ValueError(
            f"--live {url}: that proxy's simulated engine runs at --sim-time-scale {scale:g}, not in real "
            "time, so its latencies and the model's would not compare: start it at --sim-time-scale 1"
        )
    shape = health.get("engine_shape")
    if shape is not None and shape != profile.kind:
        raise ValueError(
            f"--live {url}: that proxy runs a {shape} engine, but --profile {profile.name} is "
            f"{profile.kind}: tune with a {shape} profile (the proxy's own is named in its /health)"
        )
    served = (health.get("profile") or {}).get("name")
    if isinstance(served, str) and served != profile.name:
        print(f"--live: note: {url} batches on profile {served}, this model on {profile.name}")


async def _live(
    args: argparse.Namespace, profile: EnergyProfile, best: Candidate, arrivals: list[Arrival]
) -> dict[str, Any]:
    """Apply ``best`` to the ecobatch at ``args.live``, send it ``arrivals`` (bench), and set what was
    measured beside what the model says for the same arrivals."""
    import aiohttp

    from ..bench import bench
    from ..bench.report import table

    url = args.live.rstrip("/")
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    try:
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.get(f"{url}/health") as r:
                health = await r.json(content_type=None)
            _check_same_engine(url, health, profile)
            async with s.put(f"{url}/ecobatch/batching", json=best.body(args.slo_p99_s)) as r:
                if r.status != 200:
                    raise ValueError(
                        f"--live: PUT {url}/ecobatch/batching answered {r.status}: {(await r.text())[:200]}"
                        " (an admin key: --admin-key, $ECOBATCH_ADMIN_KEY or $ECOBATCH_ADMIN_KEYS)"
                    )
    except aiohttp.ClientError as exc:
        raise ValueError(f"--live {url}: cannot reach it ({exc})") from None
    applied = best.body(args.slo_p99_s)
    print(f"--live: {url} now runs {applied} (it keeps them: PUT others to change them back)")
    bench_args = argparse.Namespace(
        model=None, api="chat", stream=False, no_ignore_eos=False, api_key=args.api_key, timeout_s=600.0,
        seed=0, quiet=args.quiet, energy=args.energy, cooldown_s=0.0, records=None,
    )  # fmt: skip
    duration_s = arrivals[-1].at_s if arrivals else 0.0
    print(
        f"\n--live: measuring the recommendation on {url} ({len(arrivals)} requests over {duration_s:.0f} s)"
    )
    summaries, _ = await bench([("recommended (live)", url)], arrivals, bench_args)
    print(table(summaries))
    measured = summaries[0]
    model = _candidate_model(profile, best, arrivals)
    energy = measured["energy"]
    reported = energy.get("ecobatch") or {}
    measured_jpr = energy.get("joules_per_request", reported.get("joules_per_request_with_idle"))
    rows = {
        "p50_s": (measured["latency_s"]["p50"], model.p50_s),
        "p99_s": (measured["latency_s"]["p99"], model.p99_s),
        "joules_per_request": (measured_jpr, model.joules_per_request),
    }
    comparison = {
        k: {"measured": m, "model": s, "model_error": (s / m - 1.0) if m else None}
        for k, (m, s) in rows.items()
    }
    # with no energy counter of its own (--energy none), bench reports ecobatch's figure: say which meter
    joules_from = "measured"
    if energy.get("joules_per_request") is None and "model" in (reported.get("sources") or []):
        joules_from = "ecobatch's modelled meter"
    for k, c in comparison.items():
        error = "—" if c["model_error"] is None else f"{100 * c['model_error']:+.1f} %"
        shown = "—" if c["measured"] is None else f"{c['measured']:.3f}"
        label = joules_from if k == "joules_per_request" else "measured"
        print(f"  {k}: {label} {shown}, model {c['model']:.3f}, model error {error}")
    return {
        "url": url,
        "energy_source": energy.get("source"),
        "ecobatch_energy_sources": reported.get("sources"),
        "measured": measured,
        "comparison": comparison,
    }

"""The run-time controller on the engine model (MODELLED: ``ecobatch tune``'s model of vLLM on the H200
reference curve, running the proxy's own decision code), against vLLM direct on the same arrivals.

For each load (Poisson 1 … 30 req/s, and a bursty 4 req/s: 5 s on, 5 s off) and tier mix (all
interactive, all flex, half and half), over 300 s of arrivals and 3 seeds, with ``max_tokens`` drawn from
{16, 32, 64, 128, 256, 512} (``ignore_eos``): J/request against vLLM direct over the same wall-clock
window, the interactive requests' p50 and p99 against direct's, and the longest wait of a flex request
for its first decode step. For the mixed loads it also gives the floor: the interactive half alone sent
at once, against all of it sent at once (what the mix would cost if flex were free).

    python benchmarks/controller_model.py      # ~2 min; results/controller-modelled.{json,md,png}
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ecobatch.config import DEFAULT_PROFILES, BatchingSettings
from ecobatch.profile import load_profile
from ecobatch.tools.bench.workload import bursty, parse_lengths, poisson, with_tiers
from ecobatch.tools.tune.sim import Controller, SendAtOnce, same_window, simulate_continuous

RESULTS = Path(__file__).parent / "results"
LENGTHS = "choice:16,32,64,128,256,512"
RATES = (1, 2, 4, 8, 12, 16, 30)
TIERS = {"interactive": 0.0, "flex": 1.0, "mixed": 0.5}
SEEDS = 3


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def row(load: str, rate: float, tier: str) -> dict[str, Any]:
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    lengths, prompt = parse_lengths(LENGTHS, "lengths"), parse_lengths("64", "prompt")
    ratios, floors, p50s, p99s, waits = [], [], [], [], []
    for seed in range(SEEDS):
        if load == "bursty":
            base = bursty(rate, 5.0, 5.0, prompt, lengths, duration_s=300.0, count=None, seed=seed)
        else:
            base = poisson(rate, prompt, lengths, duration_s=300.0, count=None, seed=seed)
        arrivals = with_tiers(base, flex_share=TIERS[tier], tier="interactive", seed=seed)
        direct = simulate_continuous(profile, arrivals, SendAtOnce())
        controlled = simulate_continuous(profile, arrivals, Controller(BatchingSettings()))
        d, c = same_window([direct, controlled])
        ratios.append(c / d)
        interactive = controlled.tier_latencies_s("interactive")
        if interactive:
            reference = direct.tier_latencies_s("interactive")
            p50s.append(statistics.median(interactive) - statistics.median(reference))
            p99s.append(quantile(list(interactive), 0.99) - quantile(list(reference), 0.99))
        waits.append(max(controlled.first_token_waits_s("flex"), default=0.0))
        if tier == "mixed":
            alone = simulate_continuous(
                profile, [a for a in arrivals if a.tier == "interactive"], SendAtOnce()
            )
            horizon = max(direct.seconds, alone.seconds)
            floors.append(alone.joules_until(horizon) / direct.joules_until(horizon))
    return {
        "load": load,
        "rate_per_s": rate,
        "tier": tier,
        "joules_per_request_vs_direct": statistics.fmean(ratios),
        "interactive_p50_delta_s": statistics.fmean(p50s) if p50s else None,
        "interactive_p99_delta_s": statistics.fmean(p99s) if p99s else None,
        "flex_longest_wait_for_first_step_s": max(waits),
        "floor_if_flex_were_free": statistics.fmean(floors) if floors else None,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for tier in TIERS:
        points = [r for r in rows if r["tier"] == tier and r["load"] == "poisson"]
        ax.plot(
            [r["rate_per_s"] for r in points],
            [r["joules_per_request_vs_direct"] for r in points],
            marker="o",
            label=tier,
        )
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("arrival rate, requests/s (Poisson)")
    ax.set_ylabel("J/request, ecobatch / vLLM direct (MODELLED)")
    ax.set_title("Run-time controller on the H200 reference curve (engine model)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    rows = [row("poisson", rate, tier) for rate in RATES for tier in TIERS]
    rows += [row("bursty", 4.0, tier) for tier in TIERS]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "controller-modelled.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# The run-time controller on the engine model (MODELLED)",
        "",
        "Made by `python benchmarks/controller_model.py`: `ecobatch tune`'s engine model on the H200",
        "vLLM bf16 reference curve, running the proxy's own decision code (`release.plan_releases`) with",
        f"the default settings, against vLLM direct on the same arrivals: 300 s, {SEEDS} seeds,",
        f"`max_tokens` {LENGTHS}.",
        "J/request over the same wall-clock window. Not a measurement.",
        "",
        "| load | req/s | tier | J/request vs direct | interactive p50 / p99 vs direct | flex longest wait "
        "| floor if flex were free |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = (
            "—"
            if r["interactive_p50_delta_s"] is None
            else f"{r['interactive_p50_delta_s']:+.3f} / {r['interactive_p99_delta_s']:+.3f} s"
        )
        floor = "—" if r["floor_if_flex_were_free"] is None else f"{r['floor_if_flex_were_free']:.3f}"
        wait = f"{r['flex_longest_wait_for_first_step_s']:.1f} s" if r["tier"] != "interactive" else "—"
        lines.append(
            f"| {r['load']} | {r['rate_per_s']:g} | {r['tier']} | {r['joules_per_request_vs_direct']:.3f} | "
            f"{delta} | {wait} | {floor} |"
        )
    (RESULTS / "controller-modelled.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        plot(rows, RESULTS / "controller-modelled.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()

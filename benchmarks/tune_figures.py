"""Figures for `ecobatch tune`'s engine model (a model, on the profiles):

1. the release-policy table the ecobatch developers measured on an H200 (vLLM 0.26 bf16, 4 req/s,
   holding arrivals only while the engine is idle: 0.91 / 0.85 / 0.75 of sending at once), reproduced
   by the model with the same policies and workload shape;
2. the policy against the oracle: the size the policy picks vs the best a sweep finds, on every
   shipped profile at loads it can serve.

    python benchmarks/tune_figures.py   # ~1 min; results/tune-reference.*, results/policy-oracle.*
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.profile import load_profile
from ecobatch.tools.bench.workload import parse_lengths, poisson
from ecobatch.tools.tune.oracle import policy_vs_oracle
from ecobatch.tools.tune.sim import FixedWindow, HoldWhileIdle, SendAtOnce, simulate_continuous

RESULTS = Path(__file__).parent / "results"
PROFILES = Path(__file__).parents[1] / "configs" / "profiles"
RAW_RELEASE_POLICY = RESULTS / "h200-release-policy" / "h200-release-policy-4rps.json"


def measured_hold_ratios(path: Path = RAW_RELEASE_POLICY) -> dict[float, float]:
    """Hold H s while idle, measured on an H200 at 4 req/s: its J/request over sending at once (the mean
    of the hold-0 phases), from the raw per-phase file."""
    phases = json.loads(path.read_text())["phases"]
    at_once = statistics.fmean(p["j_per_request"] for p in phases if p["hold_s"] == 0.0)
    return {p["hold_s"]: p["j_per_request"] / at_once for p in phases if p["hold_s"] > 0}


H200_MEASURED = {f"hold {h:g} s while idle": round(r, 3) for h, r in measured_hold_ratios().items()}
POLICIES = {
    "send at once": SendAtOnce(),
    "fixed window 1 s": FixedWindow(1.0),
    "fixed window 2.5 s": FixedWindow(2.5),
    "hold 1 s while idle": HoldWhileIdle(1.0),
    "hold 2 s while idle": HoldWhileIdle(2.0),
    "hold 4 s while idle": HoldWhileIdle(4.0),
}


def reference_table(seeds: int = 10) -> dict[str, dict[str, dict[str, float]]]:
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    lengths = parse_lengths("choice:16,32,64,128,256,512", "x")
    one = parse_lengths("1", "x")
    table: dict[str, dict[str, dict[str, float]]] = {}
    for rate in (1.0, 4.0, 12.0):
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in POLICIES}
        for seed in range(seeds):
            arrivals = poisson(rate, one, lengths, duration_s=300.0, count=None, seed=seed)
            base = simulate_continuous(profile, arrivals, SendAtOnce()).joules
            for name, policy in POLICIES.items():
                r = simulate_continuous(profile, arrivals, policy)
                runs[name].append((r.joules / base, r.p50_s, r.p99_s))
        table[f"{rate:g} req/s"] = {
            name: {
                "joules_vs_send_at_once": statistics.fmean(x[0] for x in v),
                "p50_s": statistics.fmean(x[1] for x in v),
                "p99_s": statistics.fmean(x[2] for x in v),
            }
            for name, v in runs.items()
        }
    return table


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = reference_table()
    (RESULTS / "tune-reference.json").write_text(json.dumps(table, indent=1))
    lines = [
        "# `ecobatch tune`'s engine model against the H200 release-policy measurements",
        "",
        "Made by `python benchmarks/tune_figures.py`. MODELLED: the H200 vLLM bf16 reference profile",
        "(`configs/profiles/h200-vllm-mistral7b-bf16-reference.yaml`), Poisson arrivals for 300 s,",
        "`max_tokens` drawn from {16, 32, 64, 128, 256, 512}, 10 seeds; J/request relative to sending at",
        "once (p50 / p99 seconds).",
        "",
        "| policy | " + " | ".join(table) + " |",
        "|---|" + "---|" * len(table),
    ]
    for name in POLICIES:
        cells = []
        for r in table:
            cell = table[r][name]
            cells.append(f"{cell['joules_vs_send_at_once']:.2f} ({cell['p50_s']:.2f} / {cell['p99_s']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Measured on an H200 by the ecobatch developers (vLLM 0.26.0 bf16, 4 req/s, a load client that",
        "applied the policy itself), against the model at 4 req/s:",
        "",
        "| policy | measured on the H200 | model | difference |",
        "|---|---|---|---|",
    ]
    for name, measured in H200_MEASURED.items():
        modelled = table["4 req/s"][name]["joules_vs_send_at_once"]
        lines.append(
            f"| {name} | {measured:.2f} | {modelled:.2f} | {100 * (modelled - measured):+.1f} points |"
        )
    (RESULTS / "tune-reference.md").write_text("\n".join(lines) + "\n")

    rows = []
    cases = {
        "a800-mistral7b-int8-reference": (0.25, 0.5, 1.0, 1.5),
        "h200-mistral7b-int8": (0.25, 0.5, 1.0, 1.5),
        "h200-mistral7b-bf16": (0.25, 0.5, 1.0, 1.5),
    }
    for name, rates in cases.items():
        for rate in rates:
            rows.append(policy_vs_oracle(load_profile(PROFILES / f"{name}.yaml"), rate, seeds=3))
    (RESULTS / "policy-oracle.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# The policy against the oracle",
        "",
        "Made by `python benchmarks/tune_figures.py`; pinned by `tests/unit/test_policy_oracle.py`. MODELLED",
        "(`ecobatch tune`'s engine model): Poisson arrivals for 300 s, 3 seeds, `max_tokens` from {16, 32,",
        "64, 128, 256, 512}, ecobatch's default window (50-100 ms); the size that `policy.choose_batch_size`",
        "picks (p99 SLO 30 s, 5 % energy tolerance) against the best size a sweep over 1, 2, 4, … 256 finds.",
        "",
        "| profile | req/s | policy's size | its J/request | oracle's size | its J/request | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['rate_per_s']:g} | {r['policy_size']} | "
            f"{r['policy_joules_per_request']:.1f} | {r['oracle_size']} | "
            f"{r['oracle_joules_per_request']:.1f} | {r['ratio']:.3f} |"
        )
    worst = max(rows, key=lambda r: r["ratio"])
    lines += ["", f"Worst case: {worst['ratio']:.3f}x ({worst['profile']} at {worst['rate_per_s']:g} req/s)."]
    (RESULTS / "policy-oracle.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "tune-reference.md").read_text())
    print((RESULTS / "policy-oracle.md").read_text())


if __name__ == "__main__":
    main()

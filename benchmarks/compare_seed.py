"""Markdown table: the measured H200 profiles beside the seed's A800 INT8 table.

python benchmarks/compare_seed.py > benchmarks/results/h200-vs-a800-seed.md
"""

from __future__ import annotations

import csv
from pathlib import Path

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.profile import fit_power_law, load_profile

RESULTS = Path(__file__).parent / "results"


def rows(name: str) -> dict[int, dict[str, float]]:
    with (RESULTS / f"{name}.csv").open() as f:
        return {int(r["batch_size"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}


def main() -> None:
    seed = load_profile(DEFAULT_PROFILES["static"])
    int8, bf16 = rows("h200-mistral7b-int8"), rows("h200-mistral7b-bfloat16")
    print(
        "| BS | A800 seed tok/s | H200 INT8 tok/s | H200 bf16 tok/s | A800 seed J/1k tok | "
        "H200 INT8 J/1k tok (net of idle) | H200 bf16 J/1k tok (net) | "
        "H200 INT8 J/request | H200 bf16 J/request | "
        "H200 INT8 W | H200 bf16 W | INT8 step ms | INT8 GPU util % | INT8 / bf16 J per token |"
    )
    print("|" + "---|" * 15)
    for p in seed.points:
        bs = int(p.size)
        i, b = int8[bs], bf16[bs]
        print(
            f"| {bs} | {p.tokens_per_s:,.1f} | {i['tokens_per_s']:,.1f} | {b['tokens_per_s']:,.1f} | "
            f"{p.joules_per_1k_tokens:,.0f} | "
            f"{i['joules_per_1k_tokens']:,.0f} ({i['net_joules_per_1k_tokens']:,.0f}) | "
            f"{b['joules_per_1k_tokens']:,.0f} ({b['net_joules_per_1k_tokens']:,.0f}) | "
            f"{i['joules_per_request']:,.1f} | {b['joules_per_request']:,.1f} | {i['mean_power_w']:.0f} | "
            f"{b['mean_power_w']:.0f} | {i['step_ms']:.1f} | {i['gpu_util_pct']:.0f} | "
            f"{i['joules_per_token'] / b['joules_per_token']:.2f} |"
        )
    print()
    for label, data in (("seed A800 INT8 (J/1k column)", None), ("H200 INT8", int8), ("H200 bf16", bf16)):
        if data is None:
            _, alpha = fit_power_law(seed.points)
        else:
            prof = load_profile(RESULTS / f"h200-mistral7b-{'int8' if data is int8 else 'bfloat16'}.yaml")
            _, alpha = fit_power_law(prof.points)
        print(f"- fitted α of J/token ∝ BS^-α, {label}: {alpha:.2f}")


if __name__ == "__main__":
    main()

"""What the mixed phase at one operating point cost, against its classes alone, from a truth run's own
files (``energy-truth.json``, ``records.jsonl``): arithmetic on the run's figures, not a measurement of
its own.

* the mix's energy above idle against what its requests would have cost at their classes' prices alone
  (``matched-alone-*``: the counter's energy above idle per request);
* over the span from the phase's first send to its last answer: each class's mean requests in flight,
  the generated and prompt tokens per second and the power above idle, in the mix and in the
  decode-heavy class alone;
* a generated token's price in each, once the prompts are taken out at the profile's measured prefill
  energy per token; and each class's cost at the mix's own prices against what the ledger charged.

    python benchmarks/mix_cost.py benchmarks/results/h200-energy-truth/run4 \\
        --profile configs/profiles/h200-vllm-mistral7b-bf16.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from ecobatch.profile import load_profile
from energy_truth import read_records


def _span(records: list[dict[str, Any]]) -> dict[str, Any]:
    start = min(r["sent_s"] for r in records)
    span_s = max(r["end_s"] for r in records) - start
    in_flight: dict[str, float] = defaultdict(float)
    for r in records:
        in_flight[r["cls"]] += (r["end_s"] - r["sent_s"]) / span_s
    return {
        "span_s": span_s,
        "in_flight": dict(sorted(in_flight.items())),
        "generated_per_s": sum(r["completion_tokens"] for r in records) / span_s,
        "prompt_per_s": sum(r["prompt_tokens"] for r in records) / span_s,
    }


def mix_cost(run: Path, profile_path: Path) -> dict[str, Any]:
    truth = json.loads((run / "energy-truth.json").read_text())
    phases = {p["name"]: p for p in truth["phases"]}
    records = read_records(run)
    by_phase: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_phase[r["phase"]].append(r)
    prefill_j = load_profile(profile_path).prefill_joules_per_token
    if prefill_j is None:
        raise SystemExit(f"{profile_path}: no prefill_joules_per_token to take the prompts out with")
    alone = truth["matched"]["alone_nvml_j_per_request"]
    mix = by_phase["matched-mixed"]
    count = {c: sum(1 for r in mix if r["cls"] == c) for c in alone}
    priced_alone_j = sum(count[c] * alone[c] for c in alone)
    mix_j = phases["matched-mixed"]["above_idle_j"]
    out: dict[str, Any] = {
        "command": "python benchmarks/mix_cost.py " + " ".join(sys.argv[1:]),
        "requests": count,
        "mix_above_idle_j": mix_j,
        "at_alone_prices_j": priced_alone_j,
        "mix_over_alone": mix_j / priced_alone_j - 1,
    }
    for name, key in (("matched-mixed", "mix"), ("matched-alone-D", "d_alone")):
        span = _span(by_phase[name])
        span["above_idle_w"] = phases[name]["above_idle_j"] / span["span_s"]
        # the prompts at the measured prefill price, the rest over the generated tokens
        span["generated_token_j"] = (span["above_idle_w"] - span["prompt_per_s"] * prefill_j) / span[
            "generated_per_s"
        ]
        out[key] = span
    token_j = out["mix"]["generated_token_j"]
    out["generated_token_mix_over_d_alone"] = token_j / out["d_alone"]["generated_token_j"] - 1
    out["at_mix_prices"] = {}
    for c in alone:
        rs = [r for r in mix if r["cls"] == c]
        price = statistics.fmean(
            r["prompt_tokens"] * prefill_j + r["completion_tokens"] * token_j for r in rs
        )
        charged = statistics.fmean(r["receipt_joules"] for r in rs)
        out["at_mix_prices"][c] = {
            "cost_j": price,
            "charged_j": charged,
            "charged_over_cost": charged / price,
        }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a truth run's directory")
    parser.add_argument("--profile", type=Path, required=True, help="the profile ecobatch ran on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = mix_cost(args.run, args.profile)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")

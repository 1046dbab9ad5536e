"""Replay a truth run through ecobatch's ledger, offline: the run's requests (sent, end, tokens, from
``records.jsonl``) and the GPU's counter (its 20 ms trace, ``counter-trace.csv.gz``, on the records'
clock) go into ``ecobatch.energy.ledger.Ledger`` as the meter would hand them over (intervals of
``--interval-s``, readings placed ``--lag-s`` earlier), and the receipts that come out are set beside
the ones ecobatch wrote live and beside the counter's energy per phase.

What it is for: trying a change to the split on measured data before a GPU run, and finding where a
receipt goes wrong. It is not a measurement: the live meter's sampling times, the engine's count of
another client's work and streamed requests' token times are not in the records (streamed phases are
left out), and idle power is the benchmark's, measured before each phase.

    python benchmarks/ledger_replay.py benchmarks/results/h200-energy-truth/run3/nolag \\
        --profile benchmarks/results/h200-energy-truth/run3/profile.yaml   # the profile the run used
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from ecobatch.domain import Usage
from ecobatch.energy.choose import prefill_weight
from ecobatch.energy.ledger import Ledger, LedgerReports, SettledRequest
from ecobatch.energy.marginal import MarginalModel
from ecobatch.profile import load_profile
from energy_truth import CounterTrace, read_records


class _Clock:
    """Time as the replay sets it (the ledger reads ``now`` at a request's begin and end)."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def now(self) -> float:
        return self.now_s

    async def wait(self, event: Any, deadline_s: float) -> bool:  # never awaited by the ledger
        raise NotImplementedError("the replay clock does not wait")


def replay(
    run: Path,
    profile_path: Path,
    *,
    interval_s: float,
    lag_s: float,
    tail_s: float,
    prefill_queue: bool = True,
    curve_path: Path | None = None,
) -> dict[str, Any]:
    trace = CounterTrace(run)
    counter_at, times = trace.at, trace.times_s
    run_json = json.loads((run / "energy-truth.json").read_text())
    records = read_records(run)
    streamed = {r["phase"] for r in records if r["stream"]}
    records = [r for r in records if r["phase"] not in streamed]
    idle_by_phase = {p["name"]: p["idle_w"] for p in run_json["phases"]}
    profile = load_profile(profile_path)
    curve = load_profile(curve_path) if curve_path is not None else profile
    clock, settled = _Clock(), {}

    def keep(batch: list[SettledRequest]) -> None:
        settled.update({s.request_id: s for s in batch})

    ledger = Ledger(
        source="nvml",
        prefill_weight=prefill_weight(profile, 1.0),
        idle_power_w=idle_by_phase[records[0]["phase"]],
        max_power_w=700.0,
        clock=clock,
        tail_s=tail_s,
        reports=LedgerReports(settled=keep),
        prefill_tokens_per_s=profile.prefill_tokens_per_s if prefill_queue else None,
        marginal=MarginalModel.of(curve),
    )
    # the events in time order: a request's begin and end, and each interval once its end has passed
    events: list[tuple[float, int, Any]] = []
    for k, r in enumerate(records):
        events.append((r["sent_s"], 1, ("begin", k)))
        events.append((r["end_s"], 2, ("end", k)))
    t = times[0]
    while t + interval_s + lag_s <= times[-1]:
        events.append((t + interval_s, 0, ("interval", t)))
        t += interval_s
    events.sort(key=lambda e: (e[0], e[1]))
    spans = {}
    for at_s, _, (kind, what) in events:
        clock.now_s = at_s
        if kind == "begin":
            r = records[what]
            ledger.set_idle_power(idle_by_phase[r["phase"]])
            spans[what] = ledger.begin(f"r{what}")
        elif kind == "end":
            r = records[what]
            spans.pop(what).end(Usage(r["prompt_tokens"], r["completion_tokens"]))
        else:
            t0 = what
            ledger.add_interval(
                t0, t0 + interval_s, counter_at(t0 + interval_s + lag_s) - counter_at(t0 + lag_s)
            )
    ledger.flush()
    by_phase: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for k, r in enumerate(records):
        cell = by_phase[r["phase"]][r["cls"]]
        cell["replay"].append(settled[f"r{k}"].joules)
        cell["live"].append(r["receipt_joules"] or 0.0)
    phases = {p["name"]: p for p in run_json["phases"]}
    out: dict[str, Any] = {
        "run": str(run),
        "profile": str(profile_path),
        "curve_profile": str(curve_path or profile_path),
        "lag_s": lag_s,
        "prefill_tokens_per_s": profile.prefill_tokens_per_s if prefill_queue else None,
        "phases": {},
    }
    # test 3: what the added requests added, by the ledger's marginal (the profile's power curve over
    # the sequences in flight), against the counter's difference between the phases with and without them
    out["added"] = []
    for pair in run_json.get("added", []):
        with_delta = pair["pair"][1]
        added = [k for k, r in enumerate(records) if r["phase"] == with_delta and r.get("added")]
        marginal = sum(settled[f"r{k}"].marginal_joules or 0.0 for k in added)
        out["added"].append(
            {
                "pair": pair["pair"],
                "added_requests": len(added),
                "nvml_difference_j": pair["nvml_difference_j"],
                "marginal_j": marginal,
                "ratio": marginal / pair["nvml_difference_j"],
            }
        )
    marginal_by_phase: dict[str, float] = defaultdict(float)
    for k, r in enumerate(records):
        marginal_by_phase[r["phase"]] += settled[f"r{k}"].marginal_joules or 0.0
    for name, classes in by_phase.items():
        out["phases"][name] = {
            "counter_above_idle_j": phases[name]["above_idle_j"],
            # the phase's requests' marginal figures together (modelled): alone and rarely overlapping,
            # close to the counter's energy above idle; overlapping, less (what each adds beside the rest)
            "marginal_j": marginal_by_phase[name],
            "classes": {
                cls: {
                    "requests": len(v["live"]),
                    "live_j": statistics.fmean(v["live"]),
                    "replay_j": statistics.fmean(v["replay"]),
                }
                for cls, v in sorted(classes.items())
            },
        }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a truth run's directory")
    parser.add_argument("--profile", type=Path, required=True, help="the profile ecobatch ran on")
    parser.add_argument("--interval-s", type=float, default=0.1, help="the meter's sampling interval")
    parser.add_argument("--lag-s", type=float, default=0.0, help="the counter's lag ecobatch undid")
    parser.add_argument("--tail-s", type=float, default=1.0, help="energy.tail_s")
    parser.add_argument(
        "--instant-prompts", action="store_true", help="no prefill queue: prompts at the start (as before)"
    )
    parser.add_argument(
        "--curve-profile",
        type=Path,
        help="the profile whose power curve models the marginal (default: --profile)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = replay(
        args.run,
        args.profile,
        interval_s=args.interval_s,
        lag_s=args.lag_s,
        tail_s=args.tail_s,
        prefill_queue=not args.instant_prompts,
        curve_path=args.curve_profile,
    )
    result["command"] = "python benchmarks/ledger_replay.py " + " ".join(sys.argv[1:])
    for name, phase in result["phases"].items():
        cells = "  ".join(
            f"{cls} live {c['live_j']:.1f} replay {c['replay_j']:.1f} (n={c['requests']})"
            for cls, c in phase["classes"].items()
        )
        print(
            f"{name:22s} counter {phase['counter_above_idle_j']:7.0f} J"
            f"  marginal {phase['marginal_j']:7.0f} J"
            f"  {cells}"
        )
    for pair in result["added"]:
        print(
            f"{' -> '.join(pair['pair'])}: {pair['added_requests']} added, counter"
            f" +{pair['nvml_difference_j']:.0f} J, their marginal (modelled) {pair['marginal_j']:.0f} J"
            f" ({pair['ratio']:.3f})"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")

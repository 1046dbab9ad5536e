"""Replay a truth run's counter trace through the live idle estimate: what would a meter sampling every
P seconds have read as idle power over the run's quiet spans, with the median of its windows and with
ecobatch's estimate (``ecobatch.energy.idle.band_mean_w``), against the counter's own mean there?

Quiet spans: from ``--tail-s`` after a request's end (the ledger's tail) to the next request's send,
from the run's ``records.jsonl``; the counter from its ``counter-trace.csv.gz`` (read every 20 ms
asked, ~25 ms seen, on the records' clock). Windows of ``--window-s`` are gathered as the ledger does
(whole sampling intervals, a partial window at a span's end dropped); the estimate is taken over all of
a run's windows (the live one holds the last 31).

    python benchmarks/idle_replay.py benchmarks/results/h200-energy-truth/run3/lag
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from ecobatch.energy.idle import band_mean_w
from energy_truth import CounterTrace, read_records


def quiet_spans(records: list[dict[str, Any]], tail_s: float) -> list[tuple[float, float]]:
    """The spans in which no request was in flight nor ended within ``tail_s``."""
    events = sorted((r["sent_s"], r["end_s"]) for r in records)
    spans, busy_until = [], events[0][1]
    for sent, end in events[1:]:
        if sent > busy_until + tail_s:
            spans.append((busy_until + tail_s, sent))
        busy_until = max(busy_until, end)
    return spans


def replay(run: Path, periods_s: list[float], window_s: float, tail_s: float) -> dict[str, Any]:
    at = CounterTrace(run).at
    records = read_records(run)
    spans = quiet_spans(records, tail_s)
    quiet_s = sum(b - a for a, b in spans)
    out: dict[str, Any] = {
        "run": str(run),
        "quiet_spans": len(spans),
        "quiet_s": quiet_s,
        "counter_mean_w": sum(at(b) - at(a) for a, b in spans) / quiet_s,
        "by_period": [],
    }
    for period in periods_s:
        windows = []
        for a, b in spans:
            t = a
            while True:
                n = max(1, round(window_s / period))
                if t + n * period > b:
                    break
                windows.append((at(t + n * period) - at(t), n * period))
                t += n * period
        out["by_period"].append(
            {
                "sample_period_s": period,
                "windows": len(windows),
                "median_w": statistics.median(j / s for j, s in windows),
                "band_mean_w": band_mean_w(windows),
            }
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run", type=Path, help="a truth run's directory (counter-trace.csv.gz, records.jsonl)"
    )
    parser.add_argument(
        "--periods", default="0.1,0.1005,0.101,0.102,0.1035,0.105", help="sampling periods, s"
    )
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--tail-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    result = replay(args.run, [float(p) for p in args.periods.split(",")], args.window_s, args.tail_s)
    result["command"] = "python benchmarks/idle_replay.py " + " ".join(sys.argv[1:])
    print(
        f"{result['quiet_spans']} quiet spans, {result['quiet_s']:.1f} s: "
        f"counter {result['counter_mean_w']:.1f} W"
    )
    for row in result["by_period"]:
        print(
            f"  sampled every {1000 * row['sample_period_s']:.1f} ms: {row['windows']} windows, "
            f"median {row['median_w']:.1f} W, band mean {row['band_mean_w']:.1f} W"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")

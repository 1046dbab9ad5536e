"""Rebuild a calibration's profile YAML and PNG from its CSV (same writer as `ecobatch calibrate`).

Used when a device run's YAML/PNG did not come back (the device returns at most 8 files a call) but
its CSV did: the numbers are the CSV's, unchanged; the run facts come from the calibrate log.

    python benchmarks/profile_from_csv.py benchmarks/results/h200-mistral7b-int8.csv \
        --meta-from benchmarks/results/h200-mistral7b-bfloat16.yaml --set quantization=... ...
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml

from ecobatch.tools.calibrate import CalibrationPoint, write_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv")
    parser.add_argument("--meta-from", required=True, help="a profile YAML of the same machine and run")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE (numbers parsed as YAML)")
    args = parser.parse_args()
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    ints = {"size", "runs", "generated_tokens", "peak_vram_bytes"}
    size_key = "batch_size" if "batch_size" in rows[0] else "concurrency"
    points = [
        CalibrationPoint(
            **{  # type: ignore[arg-type]
                ("size" if k == size_key else k): (int(float(v)) if k in ints | {size_key} else float(v))
                for k, v in row.items()
            }
        )
        for row in rows
    ]
    base = yaml.safe_load(Path(args.meta_from).read_text())
    meta = {k: base[k] for k in ("kind", "gpu", "model", "engine", "quantization", "idle_power_w")}
    meta.update(base["meta"])
    meta.pop("alpha_joules_per_request", None)
    for item in args.set:
        key, _, value = item.partition("=")
        meta[key] = yaml.safe_load(value)
    meta["name"] = Path(args.csv).stem
    print(write_outputs(points, meta, Path(args.csv).with_suffix(".yaml")))


if __name__ == "__main__":
    main()

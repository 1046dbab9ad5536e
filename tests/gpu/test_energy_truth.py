"""On the GPU (``pytest -m gpu``; never in CI): ecobatch's receipts against the GPU's own counter, the
goals of the energy validation (docs/energy.md). Runs ``benchmarks/energy_truth.py`` against an ecobatch
already serving in front of vLLM on this host (``ECOBATCH_TRUTH_PROXY``, e.g. started by
``bash benchmarks/h200_vllm.sh truth:bf16``), writes its files to ``ECOBATCH_RESULTS_DIR``/energy-truth,
then checks: each class alone within ±5 % of the counter's energy above idle per request; at one
operating point the mixed cost ratios within ±10 % of the ratios alone; the requests added to a steady
load: their receipts' marginal figure within ±10 % of the counter's difference; other work ≤ 0.5 % of
the counter. (Run on an H200 as the benchmark, run 4 of ``benchmarks/results/h200-energy-truth/``: the
alone classes and other work met, the mixed ratios not; the marginal figure was built after it and
checked offline on that run's data.)"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu
PROXY = os.environ.get("ECOBATCH_TRUTH_PROXY", "http://127.0.0.1:8080")
RESULTS = Path(os.environ.get("ECOBATCH_RESULTS_DIR", "benchmarks/results")) / "energy-truth"


def _benchmark() -> Any:
    path = Path(__file__).parents[2] / "benchmarks" / "energy_truth.py"
    spec = importlib.util.spec_from_file_location("energy_truth", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_receipts_match_the_gpus_own_counter() -> None:
    truth = _benchmark()
    args = argparse.Namespace(
        proxy=PROXY, counter="nvml", scale=1.0, rate=2.0, mixed_rates=(1.0, 4.0), delta_rate=2.0,
        delta_class="D", seconds=12.0, idle_s=3.0, settle_s=2.0, tail_s=1.5, closed_in_flight=12,
        out=str(RESULTS), prompt_salt=str(time.time_ns()),
        argv=["--proxy", PROXY, "--out", str(RESULTS)],
    )  # fmt: skip
    out = asyncio.run(truth.main(args))
    truth.write(dict(out), RESULTS)
    for cls, alone in out["alone"].items():
        assert 0.95 <= alone["ratio"] <= 1.05, f"{cls} alone: receipts / counter {alone['ratio']:.3f}"
    for key, ratio in out["matched"]["ratios"].items():
        assert 0.9 <= ratio["ratio"] <= 1.1, f"{key} at one operating point: {ratio['ratio']:.3f}"
    for pair in out["added"]:
        ratio = pair["marginal_ratio"]
        assert ratio is not None, f"{pair['pair']}: a Δ receipt without a marginal (unsettled, or no curve)"
        assert 0.9 <= ratio <= 1.1, f"{pair['pair']}: Δ's marginal / the counter's difference {ratio:.3f}"
    share = out["whole_run"]["other_work_share"]
    assert share is not None and share <= 0.005, f"other work {100 * share:.2f} % of the counter"

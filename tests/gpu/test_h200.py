"""On the GPU (``pytest -m gpu``; never in CI): hf-bnb INT8 serving with NVML-measured joules, and
energy conservation: Σ attributed joules (per request + idle) against the NVML counter's own delta.

Needs ECOBATCH_GPU_MODEL (a Mistral-7B-architecture directory; ``python -m ecobatch.testing.models DIR
--shape 7b --dtype float16 --device cuda`` builds one). Writes its figures to ECOBATCH_RESULTS_DIR.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ecobatch.config import load_settings
from ecobatch.energy.gpu import discover_gpus
from ecobatch.serving.app import RUNTIME, create_app
from tests.integration.helpers import metric, openai_chat_and_stream

pytestmark = pytest.mark.gpu
MODEL = os.environ.get("ECOBATCH_GPU_MODEL", "/tmp/m7")
RESULTS = Path(os.environ.get("ECOBATCH_RESULTS_DIR", "benchmarks/results"))
DTYPE = os.environ.get("ECOBATCH_GPU_DTYPE", "int8")


def _counter_j() -> float:
    return sum((g.total_energy_mj() or 0) for g in discover_gpus()) / 1000.0


async def test_hf_bnb_serves_openai_client_and_attributed_energy_adds_up(aiohttp_server: Any) -> None:
    import openai

    assert discover_gpus(), "no GPU visible through NVML"
    settings = load_settings(
        None,
        {
            "backend.kind": "hf-bnb",
            "backend.model": MODEL,
            "backend.served_model_name": "mistral-7b",
            "backend.engine_args": {"dtype": DTYPE, "device": "cuda"},
            "batching.max_batch_sequences": 32,
            "energy.meter": "nvml",
            "energy.sample_interval_s": 0.1,
        },
    )
    registry = CollectorRegistry()
    server = await aiohttp_server(create_app(settings, registry=registry))
    runtime = server.app[RUNTIME]
    meter = runtime.meter
    assert meter is not None and meter.source == "nvml"
    totals = meter.ledger.totals
    await meter.sample(force=True)
    before = (await server_get(server, "/metrics")).decode()
    start_j, start_counted = _counter_j(), totals.counter_joules
    start_accounted = totals.settled_request_joules + totals.idle_joules + totals.unattributed_joules
    t0 = time.monotonic()

    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0)
    chat, usage = await openai_chat_and_stream(client, "mistral-7b", max_tokens=8)
    assert chat.headers["x-ecobatch-energy-source"] == "nvml"
    assert float(chat.headers["x-ecobatch-energy-provisional-joules"]) > 0
    assert chat.parse().usage.completion_tokens == 8
    assert usage is not None and usage.completion_tokens == 8
    comp = await client.completions.create(
        model="mistral-7b", prompt=["a b", "c d e"], max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert len(comp.choices) == 2

    # concurrent load: 96 requests arriving over ~3 s, varied lengths
    async def one(i: int) -> str:
        await asyncio.sleep(0.03 * i)
        r = await client.completions.with_raw_response.create(
            model="mistral-7b",
            prompt=f"request {i} " * (1 + i % 7),
            max_tokens=16 + (i % 4) * 16,
            extra_body={"ignore_eos": True},
        )
        return str(r.headers["x-ecobatch-request-id"])

    ids = await asyncio.gather(*(one(i) for i in range(96)))
    await asyncio.sleep(0.5)  # an idle tail, so the idle bucket is exercised too
    await meter.sample(force=True)
    end_j = _counter_j()
    receipts = [runtime.receipts.get(i) for i in ids]
    per_request = [r["energy_joules"] for r in receipts if r is not None and r["status"] == "settled"]
    elapsed = time.monotonic() - t0
    text = (await server_get(server, "/metrics")).decode()
    await client.close()

    attributed = metric(text, "ecobatch_energy_joules_total", source="nvml") - metric(
        before, "ecobatch_energy_joules_total", source="nvml"
    )
    idle = metric(text, "ecobatch_idle_energy_joules_total", source="nvml") - metric(
        before, "ecobatch_idle_energy_joules_total", source="nvml"
    )
    other = metric(text, "ecobatch_unattributed_energy_joules_total", source="nvml") - metric(
        before, "ecobatch_unattributed_energy_joules_total", source="nvml"
    )
    counted = totals.counter_joules - start_counted
    accounted = (
        totals.settled_request_joules + totals.idle_joules + totals.unattributed_joules - start_accounted
    )
    independent = end_j - start_j
    batches = metric(text, "ecobatch_batch_size_count")
    result = {
        "what": "energy conservation, ecobatch serve --backend hf-bnb under concurrent load (NVML)",
        "dtype": DTYPE,
        "model": MODEL,
        "requests": 96 + 3,
        "batches": batches,
        "mean_batch_size": metric(text, "ecobatch_batch_size_sum") / batches,
        "seconds": round(elapsed, 2),
        "attributed_active_joules": round(attributed, 2),
        "idle_joules": round(idle, 2),
        "unattributed_joules": round(other, 2),
        "attributed_plus_idle_plus_other_joules": round(accounted, 2),
        "meter_counter_delta_joules": round(counted, 2),
        "independent_nvml_delta_joules": round(independent, 2),
        "error_vs_independent_pct": round(100 * (accounted - independent) / independent, 3),
        "settled_receipts_load_phase": len(per_request),
        "sum_of_settled_receipt_joules_load_phase": round(sum(per_request), 2),
        "idle_power_w": meter.ledger.idle_power_w,
        "request_energy_observations": metric(text, "ecobatch_request_energy_joules_count", source="nvml"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"h200-conservation-{DTYPE}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    assert result["request_energy_observations"] == 99
    assert len(per_request) == 96
    assert abs(accounted - counted) <= 1e-6 * counted + 1e-3
    assert abs(result["error_vs_independent_pct"]) <= 2.0


async def server_get(server: Any, path: str) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(str(server.make_url(path))) as r:
        return await r.read()

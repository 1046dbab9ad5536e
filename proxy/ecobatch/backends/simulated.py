"""A profile-driven engine for machines without a GPU: modelled timing, made-up text.

Static batching like HF ``generate``: one batch at a time, every step of a batch of b sequences takes
the profile's step time b / tokens_per_s(b) × ``sim_time_scale``, and a batch runs as many steps as
its longest ``max_tokens``. Tokens are whitespace-separated words (the backend's own usage counts),
generated text is deterministic per request. Energy for it comes from the modelled meter
(``source="model"``): nothing here is measured.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from ..config import BackendSettings, BatchingSettings
from ..openai_api import ENGINE_UNSUPPORTED, GenerationRequest, message_text, reject_fields
from ..policy import Headroom
from ..profile import EnergyProfile
from .base import BatchItem, GenerationResult
from .engine_output import RequestOutput

__all__ = ["SimulatedBackend"]

_WORDS = (
    "joule", "watt", "token", "batch", "window", "energy", "curve", "latency", "queue", "proxy",
    "engine", "prefill", "decode", "cache", "power", "carbon", "cost", "budget", "sweet", "spot",
    "knee", "step", "kernel", "memory", "bandwidth", "tensor", "core", "idle",
)  # fmt: skip


def _prompt_text(request: GenerationRequest, index: int) -> str:
    if request.kind == "completion":
        return request.prompts[index]
    return "\n".join(f"{m['role']}: {message_text(m)}" for m in request.messages)


class _Sequence:
    def __init__(self, output: RequestOutput, index: int, max_tokens: int, seed: int) -> None:
        self.output = output
        self.index = index
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.generated = 0
        self.done = False
        output.prompt_tokens[index] = len(_prompt_text(output.item.request, index).split())

    def step(self) -> None:
        """Generate one token (word); finish on max_tokens or a stop string."""
        word = self.rng.choice(_WORDS)
        text = word if self.generated == 0 else " " + word
        self.generated += 1
        request = self.output.item.request
        current = self.output.texts[self.index] + text
        for stop in request.stop:
            cut = current.find(stop)
            if cut >= 0:
                self._finish(current[:cut][len(self.output.texts[self.index]) :], "stop")
                return
        if self.generated >= self.max_tokens:
            self._finish(text, "length")
        else:
            self.output.add(self.index, text)

    def _finish(self, text: str, reason: str) -> None:
        self.output.completion_tokens[self.index] = self.generated
        self.output.add(self.index, text, reason)
        self.done = True


class SimulatedBackend:
    name = "simulated"
    continuous = False

    def __init__(self, profile: EnergyProfile, backend: BackendSettings, batching: BatchingSettings) -> None:
        self._profile = profile
        self._time_scale = backend.sim_time_scale
        self._default_max_tokens = batching.expected_completion_tokens
        self._model = backend.served_model_name or backend.model or "mistral-7b-int8-sim"
        self._lock = asyncio.Lock()

    @property
    def model(self) -> str:
        return self._model

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def headroom(self) -> Headroom:
        return Headroom()

    async def generate(self, batch: Sequence[BatchItem]) -> list[GenerationResult | BaseException]:
        async with self._lock:  # static batching: one batch on the "GPU" at a time
            return await self._run(batch)

    async def _run(self, batch: Sequence[BatchItem]) -> list[GenerationResult | BaseException]:
        results: list[GenerationResult | BaseException | None] = [None] * len(batch)
        outputs: list[RequestOutput | None] = [None] * len(batch)
        sequences: list[_Sequence] = []
        for i, item in enumerate(batch):
            request = item.request
            try:
                reject_fields(request, ENGINE_UNSUPPORTED, self.name)
            except Exception as exc:
                results[i] = exc
                continue
            output = RequestOutput(item)
            outputs[i] = output
            max_tokens = request.max_tokens or self._default_max_tokens
            for index in range(request.sequences):
                seed = request.seed if request.seed is not None else hash((request.id, index))
                sequences.append(_Sequence(output, index, max_tokens, seed))
        step_s = self._profile.at(max(len(sequences), 1)).step_s * self._time_scale
        while any(not s.done for s in sequences):
            if step_s > 0:
                await asyncio.sleep(step_s)
            for s in sequences:
                if not s.done:
                    s.step()
            if step_s == 0:
                await asyncio.sleep(0)  # let streams flush between steps
        for i, maybe in enumerate(outputs):
            if maybe is not None:
                results[i] = maybe.result()
        return [r if r is not None else RuntimeError("no result") for r in results]

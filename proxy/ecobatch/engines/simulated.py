"""A profile-driven static engine for machines without a GPU: modelled timing, made-up text.

Static batching like HF ``generate``: one batch at a time; every step of a batch of b sequences takes
the profile's step time b / tokens_per_s(b) × ``sim_time_scale``, and a batch runs until its longest
sequence is done. Tokens are whitespace-separated words (the backend's own usage counts); text is
deterministic per request and seed; the context length is ``backend.context_length`` (or the profile's
``meta.max_model_len``, or 4096). Energy for it comes from the modelled meter (``source="model"``):
nothing here is measured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

from prometheus_client import CollectorRegistry

from ..config import BackendSettings, BatchingSettings
from ..domain import GenerationRequest, GenerationResult, Headroom, message_text
from ..fields import BASIC_FIELDS, check_fields
from ..profile import EnergyProfile
from .base import UP, EngineHealth, EngineShape, Job, Progress
from .engine_output import RequestOutput
from .limits import fit_to_context

__all__ = ["SimulatedBackend"]

_WORDS = (
    "joule", "watt", "token", "batch", "window", "energy", "curve", "latency", "queue", "proxy",
    "engine", "prefill", "decode", "cache", "power", "carbon", "cost", "budget", "sweet", "spot",
    "knee", "step", "kernel", "memory", "bandwidth", "tensor", "core", "idle",
)  # fmt: skip
DEFAULT_CONTEXT_TOKENS = 4096


_MASK_64 = (1 << 64) - 1


class _Words:
    """A deterministic word stream per seed (a 64-bit linear congruential generator: cheap to seed,
    unlike ``random.Random``; the text is made up, only its determinism matters)."""

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK_64

    def next(self) -> str:
        self._state = (self._state * 6364136223846793005 + 1442695040888963407) & _MASK_64
        return _WORDS[(self._state >> 33) % len(_WORDS)]


def _prompt_text(request: GenerationRequest, index: int) -> str:
    if request.kind == "completion":
        return request.prompts[index]
    return "\n".join(f"{m['role']}: {message_text(m)}" for m in request.messages)


def _prompt_length(request: GenerationRequest, index: int) -> int:
    """Prompt ``index``'s tokens: its words."""
    return len(_prompt_text(request, index).split())


class _Sequence:
    def __init__(self, output: RequestOutput, index: int, max_tokens: int, seed: int) -> None:
        self.output = output
        self.index = index
        self.max_tokens = max_tokens
        self.words = _Words(seed)
        self.generated = 0
        self.done = False
        request = output.job.request
        known = request.prompt_tokens  # counted by ``prepare``
        output.prompt_tokens[index] = known[index] if known is not None else _prompt_length(request, index)

    def step(self) -> None:
        """Generate one token (word); finish on max_tokens, a stop string, or a client that left."""
        if self.output.job.cancelled():
            self._finish("", "abort")
            return
        word = self.words.next()
        text = word if self.generated == 0 else " " + word
        self.generated += 1
        self.output.job.generated(1)
        request = self.output.job.request
        current = self.output.texts[self.index] + text
        for stop in request.stop:
            cut = current.find(stop)
            if cut >= 0:
                self._finish(current[:cut][len(self.output.texts[self.index]) :], "stop", tokens=1)
                return
        if self.generated >= self.max_tokens:
            self._finish(text, "length", tokens=1)
        else:
            self.output.add(self.index, text, tokens=1)

    def run_to_the_end(self) -> None:
        """All tokens at once (instant time, nobody streaming, no stop string): the same text as stepping."""
        words = [self.words.next() for _ in range(self.max_tokens)]
        self.generated = self.max_tokens
        self.output.job.generated(self.max_tokens)
        self._finish(" ".join(words), "length", tokens=self.max_tokens)

    def _finish(self, text: str, reason: str, tokens: int = 0) -> None:
        self.output.completion_tokens[self.index] = self.generated
        self.output.add(self.index, text, reason, tokens)
        self.done = True


class SimulatedBackend:
    name = "simulated"
    shape: ClassVar[EngineShape] = "static"
    metrics_registry: CollectorRegistry | None = None

    def __init__(self, profile: EnergyProfile, backend: BackendSettings, batching: BatchingSettings) -> None:
        self._profile = profile
        self._time_scale = backend.sim_time_scale
        self._default_max_tokens = batching.expected_completion_tokens
        self.context_tokens = int(
            backend.context_length or profile.meta.get("max_model_len") or DEFAULT_CONTEXT_TOKENS
        )
        self._model = backend.served_model_name or backend.model or "mistral-7b-int8-sim"
        self._lock = asyncio.Lock()

    @property
    def model(self) -> str:
        return self._model

    async def start(self, progress: Progress) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> EngineHealth:
        return UP

    def headroom(self) -> Headroom:
        return Headroom()

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        check_fields(request, BASIC_FIELDS, self.name)
        lengths = [_prompt_length(request, i) for i in range(request.sequences)]
        return fit_to_context(request, lengths, self.context_tokens, self._default_max_tokens)

    def batch_fits(self, requests: Sequence[GenerationRequest]) -> bool:
        return True  # each simulated sequence has its own context

    async def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult | BaseException]:
        async with self._lock:  # static batching: one batch on the "GPU" at a time
            return await self._run(jobs)

    async def _run(self, jobs: Sequence[Job]) -> list[GenerationResult | BaseException]:
        outputs = [RequestOutput(job) for job in jobs]
        sequences: list[_Sequence] = []
        for output in outputs:
            request = output.job.request
            max_tokens = request.max_tokens or self._default_max_tokens
            for index in range(request.sequences):
                seed = request.seed if request.seed is not None else hash((request.id, index))
                sequences.append(_Sequence(output, index, max_tokens, seed))
        step_s = self._profile.at(max(len(sequences), 1)).step_s * self._time_scale
        if step_s == 0:
            for s in sequences:
                job = s.output.job
                if job.emit is None and not job.request.stop and not job.cancelled():
                    s.run_to_the_end()
        while any(not s.done for s in sequences):
            if step_s > 0:
                await asyncio.sleep(step_s)
            for s in sequences:
                if not s.done:
                    s.step()
            if step_s == 0:
                await asyncio.sleep(0)  # let streams flush between steps
        return [output.result() for output in outputs]

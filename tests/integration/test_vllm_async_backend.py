"""vllm-async's per-request contract against a scripted AsyncLLM: a sequence that fails takes its
siblings down with it (they are aborted in the engine), and a cancelled call aborts every sequence.

The engine is scripted, but the backend builds vLLM's own ``SamplingParams``: vLLM must be installed
(importing it takes ~10 s, which is why this is not in the unit layer)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ecobatch.backends.base import Job
from ecobatch.backends.vllm_async import VllmAsyncBackend
from ecobatch.config import load_settings
from ecobatch.errors import BadRequest
from tests.fakes import req

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@dataclasses.dataclass
class _Completion:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None


@dataclasses.dataclass
class _Output:
    prompt_token_ids: list[int]
    outputs: list[_Completion]
    finished: bool = False


class ScriptedAsyncLLM:
    """Streams one token every few milliseconds, forever; the prompt [666] fails after a moment."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.priorities: list[int] = []

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, priority: int = 0
    ) -> AsyncIterator[_Output]:
        self.running.add(request_id)
        self.priorities.append(priority)
        try:
            for _ in range(10_000):
                await asyncio.sleep(0.002)
                if prompt["prompt_token_ids"] == [666]:
                    raise ValueError("the engine refused this prompt")
                yield _Output(prompt["prompt_token_ids"], [_Completion([7], " x")])
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def backend_with(engine: ScriptedAsyncLLM) -> VllmAsyncBackend:
    settings = load_settings(None, {"backend.kind": "vllm-async", "backend.model": "/unused"})
    backend = VllmAsyncBackend(settings.backend)
    backend._engine = engine
    return backend


async def test_one_failing_sequence_aborts_its_siblings() -> None:
    engine = ScriptedAsyncLLM()
    request = dataclasses.replace(
        req(["a", "b", "c"], max_tokens=100),  # type: ignore[arg-type]
        engine_input=[[1], [666], [2]],
    )
    with pytest.raises(BadRequest, match="refused this prompt"):
        await backend_with(engine).generate(Job(request))
    await asyncio.sleep(0.01)
    assert engine.running == set(), "a sibling sequence kept decoding after its request failed"
    assert {f"{request.id}-0", f"{request.id}-2"} <= set(engine.aborted)


async def test_a_cancelled_call_aborts_every_sequence() -> None:
    engine = ScriptedAsyncLLM()
    request = dataclasses.replace(req(["a", "b"], max_tokens=100), engine_input=[[1], [2]])  # type: ignore[arg-type]
    tokens: list[int] = []
    decoding = asyncio.Event()

    def progress(n: int) -> None:
        tokens.append(n)
        if len(tokens) >= 4:
            decoding.set()

    task = asyncio.create_task(backend_with(engine).generate(Job(request, generated=progress)))
    async with asyncio.timeout(5):  # both sequences are decoding
        await decoding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.running == set()
    assert sorted(engine.aborted) == [f"{request.id}-0", f"{request.id}-1"]


async def test_the_tier_reaches_the_engine_as_its_priority() -> None:
    """With backend.engine_priority the gate writes the tier's priority into the body; vLLM's in-process
    engine gets it as ``priority`` (lower runs first)."""
    engine = ScriptedAsyncLLM()
    request = dataclasses.replace(
        req("a", max_tokens=100, priority=1),  # type: ignore[arg-type]
        engine_input=[[1]],
    )
    task = asyncio.create_task(backend_with(engine).generate(Job(request)))
    async with asyncio.timeout(5):
        while not engine.priorities:
            await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.priorities == [1]

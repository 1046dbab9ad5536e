"""vllm-async's per-request contract against a scripted AsyncLLM: outputs are pulled (the engine's
stream is read only as fast as the consumer asks), a sequence that fails takes its siblings down with it
(they are aborted in the engine), and closing the generator or cancelling its consumer aborts every
sequence.

The engine is scripted, but the backend builds vLLM's own ``SamplingParams``: vLLM must be installed
(importing it takes ~10 s, which is why this is not in the unit layer)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from ecobatch.config import load_settings
from ecobatch.domain import Usage
from ecobatch.engines.vllm_async import VllmAsyncBackend
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
    """Streams one token (" x") every few milliseconds, ``tokens`` of them (default: forever), the last
    one finished; the prompt [666] fails after a moment. It counts the outputs read from it."""

    def __init__(self, tokens: int | None = None) -> None:
        self.tokens = tokens
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.priorities: list[int] = []
        self.read = 0

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, priority: int = 0
    ) -> AsyncIterator[_Output]:
        self.running.add(request_id)
        self.priorities.append(priority)
        ids = prompt["prompt_token_ids"]
        try:
            for i in range(self.tokens or 10_000):
                await asyncio.sleep(0.002)
                if ids == [666]:
                    raise ValueError("the engine refused this prompt")
                self.read += 1
                last = self.tokens is not None and i == self.tokens - 1
                yield _Output(ids, [_Completion([7], " x", "length" if last else None)], finished=last)
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def backend_with(engine: ScriptedAsyncLLM) -> VllmAsyncBackend:
    settings = load_settings(None, {"backend.kind": "vllm-async", "backend.model": "/unused"})
    backend = VllmAsyncBackend(settings.backend)
    backend._engine = engine
    return backend


async def test_the_outputs_carry_each_sequence_text_and_tokens_then_the_engines_usage() -> None:
    engine = ScriptedAsyncLLM(tokens=3)
    request = msgspec.structs.replace(req(["a", "b"], max_tokens=3), engine_input=[[1, 2], [3]])  # type: ignore[arg-type]
    outputs = [o async for o in backend_with(engine).generate(request)]
    texts = {0: "", 1: ""}
    for o in outputs[:-1]:
        for d in o.deltas:
            texts[d.index] += d.text
    assert texts == {0: " x x x", 1: " x x x"}
    assert sum(o.new_tokens for o in outputs) == 6
    assert outputs[-1].usage == Usage(prompt_tokens=3, completion_tokens=6)
    assert engine.aborted == [], "a request that ended is not aborted"


async def test_the_engine_is_read_only_as_fast_as_the_consumer_asks() -> None:
    engine = ScriptedAsyncLLM()
    request = msgspec.structs.replace(req("a", max_tokens=100), engine_input=[[1]])  # type: ignore[arg-type]
    generation = backend_with(engine).generate(request)
    await anext(generation)
    await asyncio.sleep(0.05)  # time in which the engine could stream ~25 tokens to an eager reader
    assert engine.read == 1, "nothing was read ahead of the consumer"
    await generation.aclose()
    assert engine.running == set() and engine.aborted == [f"{request.id}-0"]


async def test_one_failing_sequence_aborts_its_siblings() -> None:
    engine = ScriptedAsyncLLM()
    request = msgspec.structs.replace(
        req(["a", "b", "c"], max_tokens=100),  # type: ignore[arg-type]
        engine_input=[[1], [666], [2]],
    )
    with pytest.raises(BadRequest, match="refused this prompt"):
        async for _ in backend_with(engine).generate(request):
            pass
    assert engine.running == set(), "a sibling sequence kept decoding after its request failed"
    assert {f"{request.id}-0", f"{request.id}-2"} <= set(engine.aborted)


async def test_a_cancelled_consumer_aborts_every_sequence() -> None:
    engine = ScriptedAsyncLLM()
    request = msgspec.structs.replace(req(["a", "b"], max_tokens=100), engine_input=[[1], [2]])  # type: ignore[arg-type]
    decoding = asyncio.Event()

    async def consume() -> None:
        tokens = 0
        async with contextlib.aclosing(backend_with(engine).generate(request)) as outputs:
            async for output in outputs:
                tokens += output.new_tokens
                if tokens >= 4:
                    decoding.set()

    task = asyncio.create_task(consume())
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
    request = msgspec.structs.replace(
        req("a", max_tokens=100, priority=1),  # type: ignore[arg-type]
        engine_input=[[1]],
    )
    generation = backend_with(engine).generate(request)
    await anext(generation)
    await generation.aclose()
    assert engine.priorities == [1]

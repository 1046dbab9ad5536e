"""Small test doubles that live next to the tests (like httpx's MockTransport)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from ecobatch.backends.base import BatchItem, GenerationResult
from ecobatch.errors import BadRequest
from ecobatch.openai_api import Usage, completion_response
from ecobatch.policy import Headroom


class FakeBackend:
    """Answers every prompt with "ok", 1 token per prompt word; records what it was asked."""

    name = "fake"

    def __init__(
        self,
        *,
        continuous: bool = False,
        delay_s: float = 0.0,
        fail_prompt: str | None = None,
        raise_exc: BaseException | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.continuous = continuous
        self.delay_s = delay_s
        self.fail_prompt = fail_prompt
        self.raise_exc = raise_exc
        self.gate = gate
        self.batches: list[list[str]] = []
        self.inflight = 0
        self.max_inflight = 0
        self.on_batch: Callable[[Sequence[BatchItem]], None] | None = None

    @property
    def model(self) -> str:
        return "fake-model"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def headroom(self) -> Headroom:
        return Headroom()

    async def generate(self, batch: Sequence[BatchItem]) -> list[GenerationResult | BaseException]:
        n = sum(item.request.sequences for item in batch)
        self.inflight += n
        self.max_inflight = max(self.max_inflight, self.inflight)
        self.batches.append([p for item in batch for p in item.request.prompts])
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.raise_exc is not None:
                raise self.raise_exc
            out: list[GenerationResult | BaseException] = []
            for item in batch:
                req = item.request
                if self.fail_prompt in req.prompts:
                    out.append(BadRequest("bad prompt", param="prompt"))
                    continue
                usage = Usage(sum(len(p.split()) for p in req.prompts), len(req.prompts))
                body = completion_response(req, ["ok"] * len(req.prompts), ["stop"] * len(req.prompts), usage)
                out.append(GenerationResult(usage=usage, body=body))
            return out
        finally:
            self.inflight -= n

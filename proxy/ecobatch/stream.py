"""A streamed request's engine outputs on their way to its HTTP handler: at most one output waits.

The handler iterates the stream (``async for``) and writes each output to its client; the stream ends
when the request is resolved (``close``, from its future's done-callback), after the output still
waiting. Two kinds of producer:

* the continuous gate awaits ``put``, which returns once the previous output has been taken: the gate
  asks the engine for the next output only as fast as the client reads (a slow client slows the pull,
  back to vLLM: an unread upstream response is not read either; an in-process request's outputs merge in
  vLLM's own collector);
* a static batch cannot wait for one slow client: ``put_nowait`` merges an output into the one still
  waiting (as vLLM's ``RequestOutputCollector`` does), so the stream never holds more than one output.
"""

from __future__ import annotations

import asyncio

from .domain import EngineOutput

__all__ = ["OutputStream"]


class OutputStream:
    __slots__ = ("_closed", "_ready", "_taken", "_waiting")

    def __init__(self) -> None:
        self._waiting: EngineOutput | None = None
        self._closed = False
        self._ready = asyncio.Event()  # an output waits, or the stream is closed
        self._taken = asyncio.Event()  # nothing waits, or the stream is closed
        self._taken.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, output: EngineOutput) -> None:
        """Hand ``output`` over once the previous one has been taken (dropped once the stream is closed:
        its request was answered, or its client left)."""
        while self._waiting is not None and not self._closed:
            await self._taken.wait()
        if not self._closed:
            self._hold(output)

    def put_nowait(self, output: EngineOutput) -> None:
        """Hand ``output`` over at once, merged into the one still waiting, if any."""
        if not self._closed:
            self._hold(output if self._waiting is None else self._waiting.merged(output))

    def _hold(self, output: EngineOutput) -> None:
        self._waiting = output
        self._taken.clear()
        self._ready.set()

    def close(self) -> None:
        """No more outputs come; the one waiting is still delivered."""
        self._closed = True
        self._ready.set()
        self._taken.set()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> EngineOutput:
        while self._waiting is None:
            if self._closed:
                raise StopAsyncIteration
            await self._ready.wait()
        output, self._waiting = self._waiting, None
        self._ready.clear()
        self._taken.set()
        return output

"""A streamed request's engine outputs on their way to its HTTP handler.

The engine side never waits for the client: the gate pulls the engine at the engine's speed, so a
request's slot, its energy span and the controller's speed estimates end when the engine is done, not
when a slow client has read the last chunk (a slow reader must not hold GPU capacity or stall the energy
ledger). What the client has not read yet waits here, in order; when the client takes, the outputs of
ecobatch's own waiting at the front go out as one (text deltas joined once, in linear time), an upstream's
own chunk alone (passed through as it came). So a stream holds at most its response, bounded by its
``max_tokens``: the same bound as a non-streamed response, which is held whole.

The handler iterates the stream (``async for``); the stream ends when the request is resolved
(``close``, from its future's done-callback), after the outputs still waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..domain import EngineOutput, merge_outputs

__all__ = ["OutputStream"]


class OutputStream:
    __slots__ = ("_closed", "_ready", "_waiting")

    def __init__(self) -> None:
        self._waiting: deque[EngineOutput] = deque()
        self._closed = False
        self._ready = asyncio.Event()  # an output waits, or the stream is closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        """Outputs the client has not taken yet."""
        return len(self._waiting)

    def put_nowait(self, output: EngineOutput) -> None:
        """Hand ``output`` over at once (dropped once the stream is closed: its request was answered, or
        its client left)."""
        if self._closed:
            return
        self._waiting.append(output)
        self._ready.set()

    def close(self) -> None:
        """No more outputs come; those waiting are still delivered."""
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> EngineOutput:
        while not self._waiting:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        waiting = self._waiting
        first = waiting.popleft()
        if first.upstream is not None or not waiting or waiting[0].upstream is not None:
            return first
        run = [first]
        while waiting and waiting[0].upstream is None:
            run.append(waiting.popleft())
        return merge_outputs(run)

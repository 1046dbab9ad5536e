"""Several async generators as one: items as each comes, each source asked for its next item only once
its previous one has been taken (nothing is read ahead). Closing the merge, or a source failing,
closes every source first (a vLLM request's sequences: one failing aborts its siblings)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import TypeVar

__all__ = ["merge"]

T = TypeVar("T")


async def _next(source: AsyncGenerator[T, None]) -> tuple[T] | None:
    """The source's next item (in a tuple: an item may be None), or None at its end."""
    try:
        return (await anext(source),)
    except StopAsyncIteration:
        return None


async def merge(sources: Sequence[AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
    asking: dict[asyncio.Future[tuple[T] | None], AsyncGenerator[T, None]] = {}
    try:
        for source in sources:
            asking[asyncio.ensure_future(_next(source))] = source
        while asking:
            done, _ = await asyncio.wait(asking, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                source = asking.pop(task)
                item = task.result()  # a source's error ends the merge (and closes the others)
                if item is None:
                    continue
                yield item[0]
                asking[asyncio.ensure_future(_next(source))] = source
    finally:
        for task in asking:
            task.cancel()  # inside its source: the source's own cleanup runs, then it is done
        await asyncio.gather(*asking, return_exceptions=True)
        for source in sources:
            await source.aclose()

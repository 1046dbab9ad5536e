"""A streamed request's outputs between the engine and its handler: never more than one waits; the gate's
``put`` waits for the handler, a static batch's ``put_nowait`` merges; the stream ends after the output
still waiting. And several engine generators pulled as one (``merge``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from ecobatch.backends.merge import merge
from ecobatch.domain import EngineOutput, TextDelta, Usage
from ecobatch.stream import OutputStream
from tests.unit.dispatch_helpers import settle


def out(text: str, index: int = 0, finish: str | None = None, tokens: int = 1) -> EngineOutput:
    return EngineOutput((TextDelta(index, text, finish),), tokens)


async def test_put_waits_until_the_previous_output_is_taken() -> None:
    stream = OutputStream()
    await stream.put(out("a"))
    second = asyncio.create_task(stream.put(out("b")))
    await settle()
    assert not second.done(), "one output waits already: the producer waits for the reader"
    assert (await anext(stream)).deltas[0].text == "a"
    await asyncio.wait_for(second, 1.0)
    assert (await anext(stream)).deltas[0].text == "b"


async def test_put_nowait_merges_into_the_output_still_waiting() -> None:
    stream = OutputStream()
    stream.put_nowait(out("one", index=0))
    stream.put_nowait(out(" two", index=0))
    stream.put_nowait(out("x", index=1, finish="length"))
    stream.put_nowait(EngineOutput(usage=Usage(3, 3)))
    merged = await anext(stream)
    assert merged.deltas == (TextDelta(0, "one two"), TextDelta(1, "x", "length"))
    assert merged.new_tokens == 3 and merged.usage == Usage(3, 3)


def test_outputs_that_carry_an_upstream_payload_are_never_merged() -> None:
    with pytest.raises(ValueError, match="upstream"):
        EngineOutput(upstream={"choices": []}).merged(out("a"))


async def test_a_closed_stream_delivers_what_waits_then_ends_and_drops_later_outputs() -> None:
    stream = OutputStream()
    await stream.put(out("last"))
    stream.close()
    await stream.put(out("too late"))
    stream.put_nowait(out("too late"))
    assert [o.deltas[0].text async for o in stream] == ["last"]


async def test_closing_wakes_a_waiting_reader_and_a_waiting_producer() -> None:
    stream = OutputStream()
    reader = asyncio.create_task(anext(stream, None))
    await stream.put(out("a"))
    assert await asyncio.wait_for(reader, 1.0) is not None
    await stream.put(out("b"))
    producer = asyncio.create_task(stream.put(out("c")))
    await settle()
    stream.close()
    await asyncio.wait_for(producer, 1.0)
    assert [o.deltas[0].text async for o in stream] == ["b"]


class Source:
    """An engine generator that yields ``n`` items, ``fail`` after the first if set; it records whether
    it was closed before its end."""

    def __init__(self, name: str, n: int, fail: bool = False) -> None:
        self.name, self.n, self.fail = name, n, fail
        self.asked = 0
        self.closed_early = False

    async def run(self) -> AsyncGenerator[str, None]:
        ended = False
        try:
            for i in range(self.n):
                self.asked += 1
                await asyncio.sleep(0)
                if self.fail and i == 1:
                    raise ValueError(f"{self.name} failed")
                yield f"{self.name}{i}"
            ended = True
        finally:
            self.closed_early = not ended


async def test_merge_yields_every_item_of_every_source() -> None:
    a, b = Source("a", 3), Source("b", 2)
    items = [item async for item in merge([a.run(), b.run()])]
    assert sorted(items) == ["a0", "a1", "a2", "b0", "b1"]
    assert items.index("a0") < items.index("a1") < items.index("a2")


async def test_merge_reads_no_source_ahead_of_its_reader() -> None:
    a, b = Source("a", 100), Source("b", 100)
    merged = merge([a.run(), b.run()])
    await anext(merged)
    await settle()
    assert a.asked + b.asked <= 3, "each source is asked for one item beyond what was taken, at most"
    await merged.aclose()
    assert a.closed_early and b.closed_early


async def test_a_failing_source_closes_the_others_and_fails_the_merge() -> None:
    a, bad, c = Source("a", 1000), Source("bad", 10, fail=True), Source("c", 1000)
    with pytest.raises(ValueError, match="bad failed"):
        async for _ in merge([a.run(), bad.run(), c.run()]):
            pass
    assert a.closed_early and c.closed_early

"""A streamed request's outputs between the engine and its handler: the producer never waits for the
reader; ecobatch's own text deltas merge when taken, an upstream's chunks queue in order; the stream
ends after the outputs still waiting. And several engine generators pulled as one (``merge``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from ecobatch.domain import EngineOutput, TextDelta, Usage, merge_outputs
from ecobatch.engines.merge import merge
from ecobatch.serving.stream import OutputStream
from tests.unit.dispatch_helpers import settle


def out(text: str, index: int = 0, finish: str | None = None, tokens: int = 1) -> EngineOutput:
    return EngineOutput((TextDelta(index, text, finish),), tokens)


async def test_the_producer_never_waits_for_the_reader_and_text_outputs_merge() -> None:
    stream = OutputStream()
    stream.put_nowait(out("one", index=0))
    stream.put_nowait(out(" two", index=0))
    stream.put_nowait(out("x", index=1, finish="length"))
    stream.put_nowait(EngineOutput(usage=Usage(3, 3)))
    assert stream.waiting == 4
    merged = await anext(stream)  # what waited, taken as one: each sequence's text joined
    assert merged.deltas == (TextDelta(0, "one two"), TextDelta(1, "x", "length"))
    assert merged.new_tokens == 3 and merged.usage == Usage(3, 3)


async def test_an_upstreams_own_chunks_queue_in_order_and_are_never_merged() -> None:
    stream = OutputStream()
    chunks = [EngineOutput(new_tokens=1, upstream={"n": i}) for i in range(3)]
    for chunk in chunks:
        stream.put_nowait(chunk)
    assert stream.waiting == 3
    stream.close()
    assert [o.upstream async for o in stream] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_outputs_that_carry_an_upstream_payload_cannot_be_merged() -> None:
    with pytest.raises(ValueError, match="upstream"):
        merge_outputs([EngineOutput(upstream={"choices": []}), out("a")])


async def test_an_upstream_chunk_between_own_outputs_keeps_its_place() -> None:
    stream = OutputStream()
    for output in (out("a"), out("b"), EngineOutput(new_tokens=1, upstream={"n": 0}), out("c")):
        stream.put_nowait(output)
    stream.close()
    taken = [(o.deltas, o.upstream) async for o in stream]
    assert taken == [((TextDelta(0, "ab"),), None), ((), {"n": 0}), ((TextDelta(0, "c"),), None)]


async def test_a_closed_stream_delivers_what_waits_then_ends_and_drops_later_outputs() -> None:
    stream = OutputStream()
    stream.put_nowait(out("last"))
    stream.close()
    stream.put_nowait(out("too late"))
    assert [o.deltas[0].text async for o in stream] == ["last"]


async def test_closing_wakes_a_waiting_reader() -> None:
    stream = OutputStream()
    reader = asyncio.create_task(anext(stream, None))
    stream.put_nowait(out("a"))
    assert await asyncio.wait_for(reader, 1.0) is not None
    reader = asyncio.create_task(anext(stream, None))
    await settle()
    assert not reader.done(), "nothing waits: the reader waits"
    stream.close()
    assert await asyncio.wait_for(reader, 1.0) is None


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

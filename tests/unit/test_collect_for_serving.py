"""The garbage collector once the engine is up (``server.collect_for_serving``): what start-up made is
out of the collector's sight, the youngest generation is collected every ``GC_YOUNG_THRESHOLD``
allocations instead of every 700, and a reference cycle made while serving is still collected on its
own."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from ecobatch.serving.server import GC_YOUNG_THRESHOLD, collect_for_serving


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_start_up_is_frozen_and_the_young_generation_collected_less_often(restored_collector: None) -> None:
    made_at_start_up = _Node()
    collect_for_serving()
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > 700
    assert gc.get_freeze_count() > 0
    assert not any(obj is made_at_start_up for obj in gc.get_objects()), "start-up's objects are frozen"


def test_a_cycle_made_while_serving_is_still_collected_without_asking(restored_collector: None) -> None:
    collect_for_serving()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    kept = [[] for _ in range(3 * GC_YOUNG_THRESHOLD)]  # allocations that stay: the collector runs
    assert gone() is None, "the cycle outlived three young-generation thresholds"
    assert len(kept) == 3 * GC_YOUNG_THRESHOLD

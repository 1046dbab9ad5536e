"""What runs on a replica: sequences, KV tokens, and when the last of it is predicted to end."""

from __future__ import annotations

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.energy.account import EnergyAccount
from ecobatch.profile import load_profile
from ecobatch.serving.pool import Occupancy
from tests.unit.dispatch_helpers import metrics_for, modelled_account


def test_a_finished_requests_end_is_forgotten_even_when_its_key_comes_back() -> None:
    """Keys are ``id()``s, which CPython reuses once an object is freed: a new request on the key of
    one that ended early must not bring that one's predicted end back."""
    occupancy = Occupancy()
    occupancy.add(1, 1, 100.0, ends_s=100.0)  # predicted to run until t=100 ...
    occupancy.remove(1)  # ... it ended at once (the client left)
    occupancy.add(1, 1, 100.0, ends_s=5.0)  # another request, the same key
    assert occupancy.busy_until_s() == 5.0
    assert occupancy.ends_s(1) == 5.0 and occupancy.sequences == 1 and occupancy.kv_tokens == 100.0


def test_the_latest_end_of_what_still_runs() -> None:
    occupancy = Occupancy()
    for key, ends_s in ((1, 3.0), (2, 9.0), (3, 6.0)):
        occupancy.add(key, 2, 10.0, ends_s)
    assert occupancy.busy_until_s() == 9.0
    occupancy.remove(2)
    assert occupancy.busy_until_s() == 6.0 and occupancy.sequences == 4
    occupancy.remove(1)
    occupancy.remove(3)
    assert occupancy.busy_until_s() is None and occupancy.sequences == 0 and occupancy.kv_tokens == 0.0


def test_under_steady_load_the_bookkeeping_stays_the_size_of_what_runs() -> None:
    """Requests that end before older ones never reach the heap's top; they must not pile up."""
    occupancy = Occupancy()
    running: list[int] = []
    for key in range(20_000):
        occupancy.add(key, 1, 1.0, ends_s=key * 0.01 + 5.0 - (key % 7) * 0.5)
        running.append(key)
        if len(running) > 20:
            occupancy.remove(running.pop(0))
        occupancy.busy_until_s()
    assert len(occupancy) == 20
    assert len(occupancy._ends) <= 2 * 21 + 32  # rebuilt past twice what runs (21 at the add) + 32
    assert occupancy.busy_until_s() == max(k * 0.01 + 5.0 - (k % 7) * 0.5 for k in running)


def test_other_clients_work_is_the_engines_count_beyond_ours_when_it_was_read() -> None:
    from ecobatch.domain import Headroom
    from ecobatch.serving.pool import Replica
    from tests.fakes import FakeContinuousEngine

    engine = FakeContinuousEngine()
    replica = Replica("r0", engine, _account())
    replica.start(1, 1, 100.0, 5.0)  # one of ours runs ...
    engine.headroom_value = Headroom(running=1, waiting=0)  # ... when the engine's figures are read
    replica.finish(1)  # ours ends before the next reading: the one read was ours, nothing else
    assert replica.other_running() == 0
    engine.headroom_value = Headroom(running=2, waiting=1)  # read while none of ours runs
    assert replica.other_running() == 3
    replica.start(2, 1, 100.0, 5.0)  # ours starts after that reading: it was not in it
    assert replica.other_running() == 3


def test_ours_that_ended_while_the_engine_was_being_read_is_not_taken_for_another_clients() -> None:
    """The scrape was sent while one of ours ran; ours ended before the answer came: the engine's one
    running request may have been ours, so no other client's work is assumed."""
    import time

    from ecobatch.domain import Headroom
    from ecobatch.serving.pool import Replica
    from tests.fakes import FakeContinuousEngine

    engine = FakeContinuousEngine()
    replica = Replica("r0", engine, _account())
    replica.start(1, 1, 100.0, 5.0)
    asked_s = time.monotonic()  # the scrape goes out ...
    replica.finish(1)  # ... ours ends ...
    engine.headroom_value = Headroom(running=1, waiting=0, read_at_s=asked_s)  # ... the answer comes
    assert replica.other_running() == 0
    later = time.monotonic()
    engine.headroom_value = Headroom(running=2, waiting=0, read_at_s=later)  # asked while none ran
    assert replica.other_running() == 2


def _account() -> EnergyAccount:
    """A modelled energy account: no energy is read in these tests."""
    profile = load_profile(DEFAULT_PROFILES["continuous"])
    return modelled_account(profile, metrics_for(profile.model))


def test_the_energy_account_counts_another_clients_work_only_when_two_readings_agree() -> None:
    """vLLM's running gauge is updated only when the engine steps: read just after our last request
    ended, it can still count it, and at rest it never goes down. Another client's work is what both
    latest readings count beyond ours, with the engine's tokens moving between them."""
    from ecobatch.domain import Headroom
    from ecobatch.serving.pool import Replica, others_running
    from tests.fakes import FakeContinuousEngine

    busy = Headroom(running=4, waiting=0, engine_tokens=1000.0)
    stale = Headroom(running=1, waiting=0, engine_tokens=1200.0)  # ours has ended: the gauge lags
    assert others_running(busy, 4, stale, 0) == 0, "ours a moment ago: not another client's"
    at_rest = Headroom(running=1, waiting=0, engine_tokens=1200.0)
    assert others_running(stale, 0, at_rest, 0) == 0, "no token moved: nothing runs"
    other = Headroom(running=3, waiting=0, engine_tokens=1500.0)
    again = Headroom(running=3, waiting=1, engine_tokens=1800.0)
    assert others_running(other, 1, again, 1) == 2, "beyond ours in both readings, tokens moving"
    assert others_running(None, 0, again, 0) == 0
    no_counters = Headroom(running=3, waiting=0)
    assert others_running(no_counters, 0, no_counters, 0) == 0, "no token counters: no evidence"

    engine = FakeContinuousEngine()
    replica = Replica("r0", engine, _account())
    engine.headroom_value = other
    assert replica.meter.others_in_flight() == 0, "one reading is not enough"
    engine.headroom_value = again
    assert replica.meter.others_in_flight() == 3, "the meter is told what the engine runs for others"

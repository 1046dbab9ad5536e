"""The routing rule with plain numbers: pack fills the fullest replica with room, round-robin takes
turns, a down replica takes nothing while another is up."""

from __future__ import annotations

from ecobatch.serving.routing import ReplicaLoad, choose_replica


def loads(*inflight: int, cap: int = 4, down: tuple[int, ...] = ()) -> list[ReplicaLoad]:
    return [ReplicaLoad(n, cap, i not in down) for i, n in enumerate(inflight)]


def test_pack_sends_to_the_fullest_replica_that_still_has_room() -> None:
    assert choose_replica(loads(0, 0, 0), 1, "pack") == 0, "all idle: the first one wakes"
    assert choose_replica(loads(2, 0, 0), 1, "pack") == 0
    assert choose_replica(loads(1, 3, 0), 1, "pack") == 1, "the fuller one, so the other can drain"
    assert choose_replica(loads(4, 0, 0), 1, "pack") == 1, "the first is at its cap: wake the next"
    assert choose_replica(loads(4, 2, 0), 1, "pack") == 1
    assert choose_replica(loads(4, 4, 4), 1, "pack") is None, "every replica at its cap: wait"


def test_a_request_larger_than_the_room_left_goes_to_an_idle_replica_or_waits() -> None:
    assert choose_replica(loads(3, 0), 2, "pack") == 1
    assert choose_replica(loads(3, 3), 2, "pack") is None
    assert choose_replica(loads(0), 9, "pack") == 0, "an idle replica takes any request: it must run"


def test_round_robin_takes_turns_among_replicas_with_room() -> None:
    assert choose_replica(loads(0, 0, 0), 1, "round-robin", after=-1) == 0
    assert choose_replica(loads(1, 0, 0), 1, "round-robin", after=0) == 1
    assert choose_replica(loads(1, 1, 0), 1, "round-robin", after=1) == 2
    assert choose_replica(loads(1, 1, 1), 1, "round-robin", after=2) == 0
    assert choose_replica(loads(1, 4, 1), 1, "round-robin", after=0) == 2, "a full one is skipped"


def test_a_down_replica_takes_nothing_while_another_is_up() -> None:
    assert choose_replica(loads(0, 0, down=(0,)), 1, "pack") == 1
    assert choose_replica(loads(0, 4, down=(0,)), 1, "pack") is None, "wait for the live one"
    assert choose_replica(loads(0, 0, down=(1,)), 1, "round-robin", after=0) == 0


def test_when_every_replica_is_down_requests_still_go_where_they_fail_at_once() -> None:
    assert choose_replica(loads(0, 0, down=(0, 1)), 1, "pack") == 0

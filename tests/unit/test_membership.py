"""The membership's rules (``plan_changes``): what a source's list does to the pool, the same for a file
and for DNS."""

from __future__ import annotations

from ecobatch.config import ReplicaSettings
from ecobatch.serving.membership import Changes, Member, plan_changes


def listed(*names: str) -> list[ReplicaSettings]:
    return [ReplicaSettings(url=f"http://{n}:8000", name=n) for n in names]


def member(name: str, *, up: bool = True, leaving: bool = False, evicted: bool = False) -> Member:
    return Member(name, f"http://{name}:8000", up=up, leaving=leaving, evicted=evicted)


def test_a_replica_wanted_and_not_in_the_pool_joins_and_one_no_longer_wanted_leaves() -> None:
    changes = plan_changes(listed("b", "c"), [member("a"), member("b")], joining={})
    assert [j.name for j in changes.joins] == ["c"]
    assert changes.leaves == ("a",)
    assert (changes.stays, changes.kept) == ((), ())


def test_the_same_list_again_changes_nothing() -> None:
    assert plan_changes(listed("a", "b"), [member("a"), member("b")], joining={}) == Changes()


def test_replicas_are_matched_by_url_as_a_server_sees_it() -> None:
    wanted = [ReplicaSettings(url="http://A:8000/", name="a")]
    assert plan_changes(wanted, [member("a")], joining={}) == Changes()


def test_a_replica_already_joining_is_not_started_twice() -> None:
    changes = plan_changes(listed("a", "b"), [member("a")], joining={"http://b:8000": "b"})
    assert changes == Changes()


def test_a_name_still_held_by_a_leaving_replica_waits_for_it_to_go() -> None:
    wanted = [ReplicaSettings(url="http://new-host:8000", name="a")]  # a's name, at another URL
    changes = plan_changes(wanted, [member("a", leaving=True), member("b")], joining={})
    assert changes.joins == ()
    held_by_a_joining = plan_changes(wanted, [member("b")], joining={"http://old-host:8000": "a"})
    assert held_by_a_joining.joins == ()


def test_a_leaving_replica_wanted_again_stays_unless_a_rule_put_it_out() -> None:
    assert plan_changes(listed("a", "b"), [member("a", leaving=True), member("b")], joining={}).stays == (
        "a",
    )
    evicted = member("a", leaving=True, evicted=True)  # it measures another's GPU
    assert plan_changes(listed("a", "b"), [evicted, member("b")], joining={}) == Changes()


def test_the_last_replica_taking_requests_never_leaves() -> None:
    changes = plan_changes(listed("x"), [member("a")], joining={})
    assert changes.leaves == () and changes.kept == ()  # x joins: a leaves once x takes requests
    assert [j.name for j in changes.joins] == ["x"]
    nothing_wanted_that_can_join = plan_changes([], [member("a"), member("b")], joining={})
    assert nothing_wanted_that_can_join.leaves == ("a",)
    assert nothing_wanted_that_can_join.kept == ("b",)


def test_a_replica_that_is_down_takes_no_request_so_the_last_one_up_stays() -> None:
    changes = plan_changes(listed("b"), [member("a"), member("b", up=False)], joining={})
    assert changes.leaves == () and changes.kept == ("a",)


def test_a_leaving_replica_wanted_again_counts_as_taking_requests() -> None:
    changes = plan_changes(listed("a"), [member("a", leaving=True), member("b")], joining={})
    assert changes.stays == ("a",) and changes.leaves == ("b",)


def test_an_unwanted_replica_waits_for_one_that_joins_before_leaving_as_the_last() -> None:
    changes = plan_changes(listed("c"), [member("a")], joining={"http://c:8000": "c"})
    assert changes == Changes()  # c is joining: a leaves at a later pass, once c takes requests

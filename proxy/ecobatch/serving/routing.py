"""Which vLLM replica runs the next request: a pure rule, and the per-replica state it reads.

Power is concave in concurrency (the measured curves are in ``configs/profiles/``, quoted in
``docs/how-it-decides.md``), so two requests decoding together on one GPU cost far fewer joules than
the same two on two GPUs. With several replicas ecobatch therefore **packs**:

* a replica takes sequences up to its **limit**, a safety limit and never an energy choice (the
  measured J/token falls with concurrency all the way to saturation): what its KV cache can hold,
  what keeps a decode step under ``batching.tpot_slo_ms`` and ``batching.max_inflight_sequences``
  (``release.inflight_limit``);
* the next request goes to the **fullest replica that still has room**, so the first replicas run
  full and the last ones stay idle (their idle power is measured and reported, not hidden); only when
  every awake replica is at its limit is the next one woken;
* ``round-robin`` is the comparison: the next replica in turn that has room (what a plain load
  balancer in front of the replicas does, within the same limits);
* a replica that is **down** (its circuit breaker is open: failed requests or probes) takes nothing
  while another is up; when every replica is down, requests still go to one, where they fail at once
  (503 ``upstream_down``) instead of waiting in the queue;
* a replica with nothing in flight takes the head request whatever its size (a request larger than
  the limit must still run somewhere).

Nothing here does I/O or reads a clock: ``choose_replica`` is tested with plain numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["ROUTING_POLICIES", "ReplicaLoad", "RoutingPolicy", "choose_replica"]

RoutingPolicy = Literal["pack", "round-robin"]
ROUTING_POLICIES: tuple[str, ...] = get_args(RoutingPolicy)


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica as the router sees it: sequences in flight, its limit now (``cap``), whether it is up."""

    inflight: int
    cap: int
    up: bool = True

    def has_room_for(self, sequences: int) -> bool:
        return self.inflight == 0 or self.inflight + sequences <= self.cap


def choose_replica(
    loads: Sequence[ReplicaLoad], sequences: int, policy: RoutingPolicy, *, after: int = -1
) -> int | None:
    """The index of the replica for a request of ``sequences``, or None when none has room now.

    ``after``: the replica chosen last (round-robin continues after it)."""
    anyone_up = any(load.up for load in loads)
    open_ = [i for i, load in enumerate(loads) if (load.up or not anyone_up) and load.has_room_for(sequences)]
    if not open_:
        return None
    if policy == "pack":
        # the fullest replica with room; among equals the first, so the last replicas stay asleep
        return max(open_, key=lambda i: (loads[i].inflight, -i))
    n = len(loads)
    return min(open_, key=lambda i: (i - after - 1) % n)

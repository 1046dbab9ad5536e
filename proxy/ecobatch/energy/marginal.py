"""What each request **added** to the GPU's energy, modelled from the power curve, as a pure function.

A receipt's charge is a **share**: the energy above idle of the steps a request rode in, split among
the requests in them. What one more request adds to steps that run anyway is much less (on an H200, 34
decode-heavy requests added to a running load raised the counter by 14 J each, where each was charged
~108 J: ``benchmarks/results/h200-energy-truth/README.md``, runs 3 and 4). The **marginal** figure
answers "what did this request cost the GPU beyond what ran anyway": over each stretch of an interval
with n sequences in flight (ecobatch's and another client's), a request running s of them adds
P(n) − P(n − s), where P is the GPU's power above idle with that many in flight (the profile's measured
points, interpolated in log2; P(0) = 0), for the time it ran there. Alone on the GPU it adds all of
P(s): the busy time it alone caused.

It is a model: the curve was measured closed-loop at a few concurrencies and interpolated between them,
and a request's effect on its neighbours' speed is left out. The members' figures do not add up to the
interval's energy (a concave curve makes the marginals sum to less). What a user deciding whether to
defer work (``service_tier: flex``) wants to know is this figure, not the share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

from .attribution import InFlight

__all__ = ["PowerCurve", "marginal_joules"]

#: sequences in flight -> the GPU's power above idle, W (0 at 0)
PowerCurve = Callable[[float], float]


def marginal_joules(
    t0_s: float,
    t1_s: float,
    members: Sequence[InFlight],
    power_above_idle_w: PowerCurve,
    other_sequences: float = 0.0,
) -> list[float]:
    """Each member's marginal joules in [t0_s, t1_s) (in ``members``' order): over each stretch between
    the members' starts and ends, P(n) − P(n − s) × its length for every member running s sequences
    there, n = the sequences of the members running there + ``other_sequences`` (another client's). A
    member that is an instant (start = end) adds nothing.

    One sweep: the sequences running in each stretch from a difference array, then for each distinct s a
    running sum of what a member of s sequences adds per stretch, so that a member's figure is the sum
    between its start and its end (O(members + stretches × distinct s), not members × stretches)."""
    cuts = sorted({t0_s, t1_s, *(m.start_s for m in members), *(m.end_s for m in members)})
    cuts = [t for t in cuts if t0_s <= t <= t1_s]
    index = {t: i for i, t in enumerate(cuts)}
    running = [0.0] * len(cuts)  # sequences starting (+) and ending (-) at each cut
    for m in members:
        if m.end_s > m.start_s:
            running[index[m.start_s]] += m.sequences
            running[index[m.end_s]] -= m.sequences
    others = max(0.0, other_sequences)
    sizes = {m.sequences for m in members}
    cumulative = {s: [0.0] * len(cuts) for s in sizes}  # joules a member of s sequences adds to each cut
    ours = 0.0
    for i, (a, b) in enumerate(pairwise(cuts)):
        ours += running[i]
        n = ours + others
        full = power_above_idle_w(n) if ours > 0 else 0.0
        for s, sums in cumulative.items():
            added = max(0.0, full - power_above_idle_w(max(0.0, n - s))) if ours >= s else 0.0
            sums[i + 1] = sums[i] + added * (b - a)
    return [
        cumulative[m.sequences][index[m.end_s]] - cumulative[m.sequences][index[m.start_s]]
        if m.end_s > m.start_s
        else 0.0
        for m in members
    ]

"""What each request **added** to the GPU's energy, modelled from the profile, as pure functions.

A receipt's charge is a **share**: the energy above idle of the steps a request rode in, split among
the requests in them. What one more request adds to steps that run anyway is much less (on an H200, 34
decode-heavy requests added to a running load raised the counter by 14 J each, where each was charged
108–110 J in run 4 and 93–97 J in run 3: ``benchmarks/results/h200-energy-truth/README.md``). The
**marginal** figure answers "what did sending this request now cost the GPU beyond what ran anyway", in
two parts:

* its **time**: over each stretch of its life with n sequences in flight (ecobatch's and another
  client's), a request running s of them adds P(n) − P(n − s), where P is the GPU's power above idle
  with that many in flight (the profile's measured points, interpolated in log2; P(0) = 0), for the time
  it ran there. Alone on the GPU it adds all of P(s): the busy time it alone caused;
* its **prompt**, beyond that: the curve is the power of decoding, and prefill draws more. Each prompt
  token adds the profile's prefill point's energy above idle per token less what the curve gives for
  the time it takes there (P(c) / the prefill rate, c its concurrency): ``MarginalModel.prompt_excess_
  joules_per_token`` (none where the profile has no prefill point).

It is a model: the curve was measured closed-loop at a few concurrencies (decode-heavy requests) and
interpolated between them, the prefill point at one; a request's effect on its neighbours' speed and the
power's decay after it ends are left out, its time in flight counts whether or not the GPU works on it
then (the HTTP exchange, tokenizing), and every prompt token counts, also those the engine serves from
its prefix cache (which it does not prefill). On a static engine's profile the curve is per batch size:
the same rule, not validated there. The members' figures do not add up to the interval's energy (a
concave curve makes the marginals sum to less). Deferring a request (``service_tier: flex``) saves its
marginal only if it later joins running work: run alone later, it adds all of P(s) again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ..profile import EnergyProfile
from .attribution import InFlight

__all__ = ["MarginalModel", "PowerCurve", "marginal_joules"]

#: sequences in flight -> the GPU's power above idle, W (0 at 0)
PowerCurve = Callable[[float], float]


@dataclass(frozen=True, slots=True)
class MarginalModel:
    """What the marginal figure is modelled from (a profile's): the power curve, and what a prompt token
    adds beyond it (0: no prefill point measured)."""

    power_above_idle_w: PowerCurve
    prompt_excess_joules_per_token: float = 0.0

    @classmethod
    def of(cls, profile: EnergyProfile) -> MarginalModel | None:
        """The profile's model; None for a profile without an idle power (no curve above idle). The
        prompt's excess needs the prefill point's energy per token, rate and concurrency
        (``meta.prefill``, written by ``ecobatch calibrate``)."""
        if profile.idle_power_w is None:
            return None
        excess = 0.0
        rate, per_token = profile.prefill_tokens_per_s, profile.prefill_joules_per_token
        concurrency = profile.prefill_concurrency
        if rate is not None and per_token is not None and concurrency is not None:
            excess = max(0.0, per_token - profile.power_above_idle_w(concurrency) / rate)
        return cls(profile.power_above_idle_w, excess)


def marginal_joules(
    t0_s: float,
    t1_s: float,
    members: Sequence[InFlight],
    power_above_idle_w: PowerCurve,
    other_sequences: float = 0.0,
) -> list[float]:
    """Each member's marginal joules in [t0_s, t1_s) (in ``members``' order; what of them lies outside
    the interval is left out): over each stretch between the members' starts and ends, P(n) − P(n − s) ×
    its length for every member running s sequences there, n = the sequences of the members running
    there + ``other_sequences`` (another client's). A member that is an instant (start = end) adds
    nothing.

    One sweep: the sequences running in each stretch from a difference array, then for each distinct s a
    running sum of what a member of s sequences adds per stretch, so that a member's figure is the sum
    between its start and its end (O(members + stretches × distinct s), not members × stretches)."""
    spans = [(max(m.start_s, t0_s), min(m.end_s, t1_s)) for m in members]  # the parts inside
    cuts = sorted({t0_s, t1_s, *(a for a, _ in spans), *(b for _, b in spans)})
    cuts = [t for t in cuts if t0_s <= t <= t1_s]
    index = {t: i for i, t in enumerate(cuts)}
    running = [0.0] * len(cuts)  # sequences starting (+) and ending (-) at each cut
    for m, (a, b) in zip(members, spans, strict=True):
        if b > a:
            running[index[a]] += m.sequences
            running[index[b]] -= m.sequences
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
        cumulative[m.sequences][index[b]] - cumulative[m.sequences][index[a]] if b > a else 0.0
        for m, (a, b) in zip(members, spans, strict=True)
    ]

"""What a benchmark sends, and when: a seeded, reproducible list of arrivals.

Arrivals (``--arrivals``):

* ``poisson``: exponential gaps at ``rate`` requests per second;
* ``bursty``: on/off: Poisson during ``on_s``-second bursts, silence for ``off_s`` seconds between
  them; the rate inside a burst is ``rate × (on_s + off_s) / on_s``, so the mean rate is ``rate``;
* ``diurnal``: a day's shape compressed into ``duration`` seconds: Poisson at the rate
  ``rate × (1 − ⅔ cos(2π t / duration))``: a third of ``rate`` at the start and end (night), five
  thirds of it half-way (the midday peak), ``rate`` on average over the whole day (``--requests`` cuts
  the day short);
* a JSONL trace: one object a line with ``timestamp`` (seconds; shifted to start at 0),
  ``prompt_tokens`` and ``output_tokens``.

Lengths (``--prompt-tokens``, ``--output-tokens``): ``N`` (fixed), ``uniform:A-B`` (integers),
``choice:A,B,C`` (equally likely), ``lognormal:MEDIAN,SIGMA,MAX`` (heavy-tailed: ``MEDIAN × e^(SIGMA·z)``
for a standard normal z, rounded, within 1…MAX). A prompt of N tokens is N random words (about one
token each with a BPE tokenizer; the engine's own count is what the report uses).

Tiers (``--flex-share``, ``--service-tier``): each arrival's ``service_tier``, drawn with its own seed so
that the same arrivals keep the same times and lengths whatever share of them is flex.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...domain import Tier

__all__ = [
    "Arrival",
    "Lengths",
    "bursty",
    "diurnal",
    "parse_lengths",
    "poisson",
    "prompt_text",
    "read_trace",
    "with_tiers",
]

_WORDS = (
    "energy", "batch", "token", "window", "curve", "power", "joule", "queue", "engine", "latency",
    "proxy", "decode", "prefill", "cache", "kernel", "memory", "tensor", "carbon", "budget", "idle",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int
    tier: Tier = "interactive"


def with_tiers(arrivals: Sequence[Arrival], *, flex_share: float, tier: Tier, seed: int) -> list[Arrival]:
    """The same arrivals, each ``flex`` with probability ``flex_share`` and ``tier`` otherwise."""
    if not 0.0 <= flex_share <= 1.0:
        raise ValueError(f"--flex-share={flex_share} must be between 0 and 1")
    rng = random.Random(f"tiers-{seed}")
    return [dataclasses.replace(a, tier="flex" if rng.random() < flex_share else tier) for a in arrivals]


Lengths = Callable[[random.Random], int]


def parse_lengths(spec: str, what: str) -> Lengths:
    """``N``, ``uniform:A-B``, ``choice:A,B,…`` or ``lognormal:MEDIAN,SIGMA,MAX``; a bad spec names the
    option and the forms."""
    try:
        if spec.startswith("lognormal:"):
            median_s, sigma_s, most_s = spec[len("lognormal:") :].split(",")
            median, sigma, most = float(median_s), float(sigma_s), int(most_s)
            if not (1 <= median <= most and 0 <= sigma <= 10):
                raise ValueError
            log_median, log_most = math.log(median), math.log(most)
            # the exponent capped at MAX's before exp: a long tail, never an overflow
            return lambda rng: max(
                1, round(math.exp(min(log_most, log_median + sigma * rng.gauss(0.0, 1.0))))
            )
        if spec.startswith("uniform:"):
            lo, hi = (int(x) for x in spec[len("uniform:") :].split("-"))
            if not 1 <= lo <= hi:
                raise ValueError
            return lambda rng: rng.randint(lo, hi)
        if spec.startswith("choice:"):
            options = [int(x) for x in spec[len("choice:") :].split(",")]
            if not options or min(options) < 1:
                raise ValueError
            return lambda rng: rng.choice(options)
        fixed = int(spec)
        if fixed < 1:
            raise ValueError
        return lambda rng: fixed
    except ValueError:
        raise ValueError(
            f"{what}={spec!r}: give N, uniform:A-B or choice:A,B,C (positive integers), or "
            "lognormal:MEDIAN,SIGMA,MAX (1 <= MEDIAN <= MAX, 0 <= SIGMA <= 10, MAX an integer)"
        ) from None


def _draw(times: list[float], prompt: Lengths, output: Lengths, rng: random.Random) -> list[Arrival]:
    return [Arrival(t, prompt(rng), output(rng)) for t in times]


def poisson(
    rate_per_s: float,
    prompt: Lengths,
    output: Lengths,
    *,
    duration_s: float | None,
    count: int | None,
    seed: int,
) -> list[Arrival]:
    if rate_per_s <= 0:
        raise ValueError(f"rate={rate_per_s} must be > 0")
    rng = random.Random(seed)
    times: list[float] = []
    t = rng.expovariate(rate_per_s)
    while (duration_s is None or t < duration_s) and (count is None or len(times) < count):
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return _draw(times, prompt, output, rng)


def bursty(
    rate_per_s: float,
    on_s: float,
    off_s: float,
    prompt: Lengths,
    output: Lengths,
    *,
    duration_s: float | None,
    count: int | None,
    seed: int,
) -> list[Arrival]:
    if rate_per_s <= 0 or on_s <= 0 or off_s < 0:
        raise ValueError(f"rate={rate_per_s}, on={on_s}, off={off_s}: need rate > 0, on > 0, off >= 0")
    rng = random.Random(seed)
    burst_rate = rate_per_s * (on_s + off_s) / on_s
    times: list[float] = []
    period = on_s + off_s
    t = rng.expovariate(burst_rate)
    while (duration_s is None or t < duration_s) and (count is None or len(times) < count):
        if t % period < on_s:
            times.append(t)
            t += rng.expovariate(burst_rate)
        else:
            t = (t // period + 1) * period  # jump to the next burst
    return _draw(times, prompt, output, rng)


def diurnal(
    rate_per_s: float,
    prompt: Lengths,
    output: Lengths,
    *,
    duration_s: float | None,
    count: int | None,
    seed: int,
) -> list[Arrival]:
    """A day compressed into ``duration_s``: Poisson at ``rate × (1 − ⅔ cos(2π t / duration))`` (thinned
    from its peak rate, so the same seed gives the same day)."""
    if duration_s is None or duration_s <= 0:
        raise ValueError("--arrivals diurnal needs --duration (the compressed day's length, > 0)")
    if rate_per_s <= 0:
        raise ValueError(f"rate={rate_per_s} must be > 0")
    rng = random.Random(seed)
    peak = rate_per_s * 5.0 / 3.0
    times: list[float] = []
    t = rng.expovariate(peak)
    while t < duration_s and (count is None or len(times) < count):
        if rng.random() * peak < rate_per_s * (1.0 - 2.0 / 3.0 * math.cos(2.0 * math.pi * t / duration_s)):
            times.append(t)
        t += rng.expovariate(peak)
    return _draw(times, prompt, output, rng)


def read_trace(path: Path, *, count: int | None = None) -> list[Arrival]:
    arrivals = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            arrivals.append(
                Arrival(float(row["timestamp"]), int(row["prompt_tokens"]), int(row["output_tokens"]))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{n}: each line must be a JSON object with timestamp, prompt_tokens and "
                f"output_tokens ({exc})"
            ) from None
    arrivals.sort(key=lambda a: a.at_s)
    if not arrivals:
        raise ValueError(f"{path}: the trace is empty")
    start = arrivals[0].at_s
    shifted = [Arrival(a.at_s - start, a.prompt_tokens, a.output_tokens) for a in arrivals]
    return shifted[:count] if count is not None else shifted


def prompt_text(tokens: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(tokens))

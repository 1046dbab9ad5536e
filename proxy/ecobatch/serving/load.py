"""Live load estimates for the release controller, on injected times (seconds on a monotonic clock).

``LoadTracker`` keeps, over a sliding window, what ``release.plan_releases`` needs to decide from the
load as it is now rather than from numbers tuned offline:

* **arrival rates** per tier: arrivals in the last ``window_s`` over ``window_s``; when the queue has
  been quiet for longer than the mean gap, the quiet time itself counts as the gap, so the estimate
  falls during a lull instead of remembering the last burst;
* the **output-length mix**: a sample of recent requests' predicted generated tokens;
* **predicted lengths**: a request asking for ``max_tokens`` generates ``max_tokens`` × the mean share
  recent requests generated of theirs (requests stop early on EOS); one without ``max_tokens`` the mean
  length such requests generated (until seen: ``batching.expected_completion_tokens``). A prompt not
  tokenized by ecobatch (a remote vLLM tokenizes) is its characters × the tokens per character measured
  on the engine's own counts;
* the engine's **speed**: measured per-sequence decode speed over the profile's at the same mean
  concurrency (so the profile's curve keeps its shape but gets the engine's level: another GPU, another
  model, a CPU test engine);
* the engine's **time to first token** after a release, measured on streams.

Every estimate is a plain number a test can drive with a fake clock; ``estimate`` packs them.
"""

from __future__ import annotations

from collections import deque

from ..domain import TIERS, Tier
from ..profile import EnergyProfile
from .release import LoadEstimate

__all__ = ["LoadTracker"]

#: requests whose generated tokens are fewer than this say little about decode speed
_MIN_TOKENS_FOR_SPEED = 8


class _WindowMean:
    """Mean of the last ``size`` values, O(1) per update."""

    def __init__(self, size: int, prior: float) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._sum = 0.0
        self.prior = prior

    def add(self, value: float) -> None:
        if len(self._values) == self._values.maxlen:
            self._sum -= self._values[0]
        self._values.append(value)
        self._sum += value

    @property
    def mean(self) -> float:
        return self._sum / len(self._values) if self._values else self.prior

    @property
    def count(self) -> int:
        return len(self._values)


class LoadTracker:
    def __init__(
        self,
        *,
        window_s: float = 10.0,
        expected_completion_tokens: float = 256.0,
        sample_size: int = 64,
        profile: EnergyProfile | None = None,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"{window_s=} must be > 0")
        self.window_s = window_s
        self._profile = profile
        self._arrivals: dict[Tier, deque[float]] = {tier: deque() for tier in TIERS}
        self._sample: deque[float] = deque(maxlen=sample_size)
        self._kv_per_sequence = _WindowMean(128, 128.0 + expected_completion_tokens)
        self._share = _WindowMean(128, 1.0)  # generated / max_tokens
        self._unbounded = _WindowMean(128, expected_completion_tokens)  # no max_tokens: generated
        self._tokens_per_char = _WindowMean(128, 0.25)
        self._speed = _WindowMean(64, 1.0)
        self._ttft = _WindowMean(64, 0.0)

    # ---- events ----------------------------------------------------------------------------------
    def arrived(
        self, now_s: float, tier: Tier, output_tokens_per_sequence: float, kv_tokens_per_sequence: float
    ) -> None:
        """A request arrived, predicted to generate ``output_tokens_per_sequence`` and to hold
        ``kv_tokens_per_sequence`` of KV cache at its end (per sequence)."""
        self._arrivals[tier].append(now_s)
        self._trim(now_s)
        self._kv_per_sequence.add(kv_tokens_per_sequence)
        if tier != "flex":
            self._sample.append(output_tokens_per_sequence)

    def finished(
        self,
        *,
        max_tokens: int | None,
        completion_tokens_per_sequence: float,
        decode_s: float,
        mean_concurrency: float,
    ) -> None:
        """A request ended with the engine's count: learn its length, and its decode speed (generated
        tokens per sequence over ``decode_s``, at ``mean_concurrency`` sequences in flight)."""
        if max_tokens:
            self._share.add(min(1.0, completion_tokens_per_sequence / max_tokens))
        else:
            self._unbounded.add(completion_tokens_per_sequence)
        if (
            self._profile is not None
            and completion_tokens_per_sequence >= _MIN_TOKENS_FOR_SPEED
            and decode_s > 0
        ):
            c = max(mean_concurrency, 1.0)
            profile_tok_s = self._profile.at(c).tokens_per_s / c
            measured_tok_s = completion_tokens_per_sequence / decode_s
            self._speed.add(min(100.0, max(0.01, measured_tok_s / profile_tok_s)))

    def prompt_measured(self, characters: int, prompt_tokens: int) -> None:
        if characters > 0 and prompt_tokens > 0:
            self._tokens_per_char.add(prompt_tokens / characters)

    def first_token(self, ttft_s: float) -> None:
        """A streamed request's first token came ``ttft_s`` after its release."""
        if ttft_s >= 0:
            self._ttft.add(ttft_s)

    # ---- predictions -----------------------------------------------------------------------------
    def predict_output_tokens(self, max_tokens: int | None) -> float:
        """Generated tokens one sequence is predicted to produce."""
        if max_tokens:
            return max(1.0, max_tokens * self._share.mean)
        return max(1.0, self._unbounded.mean)

    def predict_prompt_tokens(self, characters: int) -> float:
        return characters * self._tokens_per_char.mean

    # ---- rates -------------------------------------------------------------------------------------
    def _trim(self, now_s: float) -> None:
        horizon = now_s - self.window_s
        for times in self._arrivals.values():
            while times and times[0] < horizon:
                times.popleft()

    def rate_per_s(self, now_s: float, tiers: tuple[Tier, ...] = TIERS) -> float:
        """Arrivals per second of ``tiers``: those in the last ``window_s`` over ``window_s`` (so a burst
        at one instant reads as its share of the window, not as an endless stream; a new proxy reads low
        for its first window, which makes it hold less, never more). During a lull the quiet time since
        the last arrival counts as the gap."""
        self._trim(now_s)
        count = sum(len(self._arrivals[t]) for t in tiers)
        if count == 0:
            return 0.0
        rate = count / self.window_s
        last = max(self._arrivals[t][-1] for t in tiers if self._arrivals[t])
        quiet = now_s - last
        if quiet > 1.0 / rate:  # a lull: longer than the mean gap
            rate = min(rate, 1.0 / quiet)
        return rate

    @property
    def kv_tokens_per_sequence(self) -> float:
        """Mean predicted KV tokens per sequence of recent requests (prompt + generated)."""
        return self._kv_per_sequence.mean

    @property
    def speed_factor(self) -> float:
        return self._speed.mean

    @property
    def ttft_s(self) -> float:
        return self._ttft.mean

    @property
    def mean_share(self) -> float:
        """Mean share of ``max_tokens`` recent requests generated."""
        return self._share.mean

    def estimate(self, now_s: float) -> LoadEstimate:
        return LoadEstimate(
            arrival_rate_per_s=self.rate_per_s(now_s, ("priority", "interactive")),
            output_tokens_sample=tuple(self._sample),
            speed_factor=self.speed_factor,
            ttft_s=self.ttft_s,
        )

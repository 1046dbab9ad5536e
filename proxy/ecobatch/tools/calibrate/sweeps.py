"""The calibration sweeps: a static engine per batch size, a vLLM server per concurrency.

* ``calibrate_hf`` (static batches, in this process): per batch size a warm-up run, then timed runs of
  ``new_tokens`` tokens (EOS ignored, greedy) repeated until ``min_seconds`` have passed. cuDNN SDPA is
  disabled (see ``hf_bnb``), so every timed run is warm; the warm-up covers allocator and first launches.
* ``calibrate_vllm_http`` (a running vLLM server on this machine's GPUs): per concurrency C a closed
  loop keeps C requests of ``prompt_tokens`` token ids and ``new_tokens`` tokens in flight; after
  ``warmup_s`` the window opens, lasts ``min_seconds``, and counts generated tokens from vLLM's own
  ``vllm:generation_tokens_total``; then the loop stops and in-flight requests drain (cool-down).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...energy.counters import NvmlCounters
from ...engines import upstream_http
from ...exposition import samples
from .lag import completion_bursts, probe_counter_lag
from .measure import EnergyWindow
from .report import CalibrationPoint, make_point, report_line

__all__ = ["calibrate_hf", "calibrate_vllm_http"]


def calibrate_hf(
    model_path: str,
    *,
    dtype: str,
    batch_sizes: Sequence[int],
    new_tokens: int,
    prompt_tokens: int,
    min_seconds: float,
    warmup_tokens: int,
    counters: NvmlCounters,
    idle_power_w: float,
    progress: Callable[[str], None] = print,
) -> tuple[list[CalibrationPoint], dict[str, Any]]:
    """Run the sweep with the hf-bnb backend's own generator; return the points and run facts."""
    import torch

    from ...engines.hf_bnb import SeqSpec, StaticBatchGenerator, load_model

    loaded = load_model(model_path, dtype=dtype, device="cuda")
    progress(f"loaded {model_path} as {dtype} in {loaded.load_s:.1f} s")
    gen = StaticBatchGenerator(loaded)
    vocab = loaded.model.config.vocab_size
    specials = set(loaded.tokenizer.all_special_ids)
    rng = random.Random(0)
    points = []
    for bs in batch_sizes:
        prompts = [
            [t for t in (rng.randrange(3, vocab) for _ in range(prompt_tokens * 2)) if t not in specials][
                :prompt_tokens
            ]
            for _ in range(bs)
        ]

        def batch(tokens: int, prompts: list[list[int]] = prompts) -> list[SeqSpec]:
            return [
                SeqSpec(prompt_ids=p, max_tokens=tokens, temperature=0.0, ignore_eos=True) for p in prompts
            ]

        gen.run(batch(warmup_tokens))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        runs, generated, prefill_s, decode_s, steps = 0, 0, 0.0, 0.0, 0
        with EnergyWindow(counters) as window:
            t0 = time.monotonic()
            while runs == 0 or time.monotonic() - t0 < min_seconds:
                seqs = batch(new_tokens)
                stats = gen.run(seqs)
                runs += 1
                generated += sum(len(s.generated) for s in seqs)
                prefill_s += stats.prefill_s
                decode_s += stats.decode_s
                steps += stats.steps
            torch.cuda.synchronize()
        point = make_point(
            bs,
            runs,
            window,
            generated,
            bs * runs,
            idle_power_w,
            step_ms=1000 * decode_s / max(steps - runs, 1),
            prefill_ms=1000 * prefill_s / runs,
            peak_vram_bytes=int(torch.cuda.max_memory_allocated()),
        )
        points.append(point)
        report_line(progress, point, len(points), len(batch_sizes))
    facts = {
        "load_s": round(loaded.load_s, 2),
        "cudnn_sdpa": bool(torch.backends.cuda.cudnn_sdp_enabled()),
        "torch": str(torch.__version__),
    }
    return points, facts


async def _counted_tokens(session: Any, base: str, metric: str) -> float:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(s.value for _, s in samples(text, (metric,)))


@dataclass(frozen=True, slots=True)
class _LoopWindow:
    """What a closed loop did inside its energy window."""

    window: EnergyWindow
    finished: int
    #: the tokens vLLM counted in the window (generated, or prompt tokens: the metric asked for)
    tokens: int


async def _closed_loop(
    session: Any,
    probe: Any,
    base: str,
    body: Callable[[], dict[str, Any]],
    *,
    concurrency: int,
    warmup_s: float,
    min_seconds: float,
    counters: NvmlCounters,
    metric: str,
) -> _LoopWindow:
    """Keep ``concurrency`` requests in flight; after ``warmup_s`` measure ``min_seconds`` of energy and
    of vLLM's own ``metric`` count; then stop and let the requests in flight drain."""

    stop = asyncio.Event()
    finished = 0

    async def worker() -> None:
        nonlocal finished
        while not stop.is_set():
            async with await upstream_http.post(session, f"{base}/v1/completions", body()) as r:
                if r.status != 200:
                    raise RuntimeError(f"vLLM answered {r.status}: {(await r.text())[:300]}")
                await r.read()
            finished += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        tokens0, done0 = await _counted_tokens(probe, base, metric), finished
        with EnergyWindow(counters) as window:
            await asyncio.sleep(min_seconds)
        tokens1, done1 = await _counted_tokens(probe, base, metric), finished
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return _LoopWindow(window, done1 - done0, int(tokens1 - tokens0))


async def calibrate_vllm_http(
    base_url: str,
    *,
    batch_sizes: Sequence[int],
    new_tokens: int,
    prompt_tokens: int,
    min_seconds: float,
    warmup_s: float,
    counters: NvmlCounters,
    idle_power_w: float,
    model: str | None = None,
    prefill_prompt_tokens: int = 1024,
    prefill_concurrency: int = 8,
    progress: Callable[[str], None] = print,
) -> tuple[list[CalibrationPoint], dict[str, Any]]:
    """Closed-loop sweep against a running vLLM OpenAI server whose GPUs ``counters`` reads: per
    concurrency C, C requests kept in flight. Then the prefill point: ``prefill_concurrency`` requests
    of ``prefill_prompt_tokens`` prompt tokens and one output token each, whose energy above idle per
    prompt token is the profile's ``prefill_joules_per_token``."""
    import aiohttp

    base = base_url.rstrip("/")
    rng = random.Random(0)
    vocab_guess = 256  # token ids below this exist in any vocabulary worth measuring
    # No connection limit for the load (aiohttp's default pool of 100 capped "256 in flight" at 100),
    # and /metrics on a session of its own: behind queued load requests it waited forever.
    async with (
        upstream_http.session() as session,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as probe,
    ):
        async with probe.get(f"{base}/v1/models") as resp:
            resp.raise_for_status()
            served = (await resp.json())["data"][0]
        model = model or served["id"]

        def body(prompt: int, out: int) -> Callable[[], dict[str, Any]]:
            def make() -> dict[str, Any]:
                return {
                    "model": model,
                    "prompt": [rng.randrange(3, vocab_guess) for _ in range(prompt)],
                    "max_tokens": out,
                    "ignore_eos": True,
                    "temperature": 0.0,
                }

            return make

        points = []
        for c in batch_sizes:
            run = await _closed_loop(
                session,
                probe,
                base,
                body(prompt_tokens, new_tokens),
                concurrency=c,
                metric="vllm:generation_tokens_total",
                warmup_s=warmup_s,
                min_seconds=min_seconds,
                counters=counters,
            )
            if run.tokens <= 0:
                raise RuntimeError(f"vLLM generated no tokens in {min_seconds} s at {c} in flight")
            point = make_point(c, run.finished, run.window, run.tokens, run.tokens / new_tokens, idle_power_w)
            points.append(point)
            report_line(progress, point, len(points), len(batch_sizes))
        prefill = await _prefill_point(
            session,
            probe,
            base,
            body,
            prompt_tokens=_fit_prompt(prefill_prompt_tokens, served.get("max_model_len")),
            concurrency=prefill_concurrency,
            warmup_s=warmup_s,
            min_seconds=min_seconds,
            counters=counters,
            idle_power_w=idle_power_w,
            progress=progress,
        )
        lag = await _counter_lag(session, base, body, counters, idle_power_w, progress)
    facts = {"served_model": model, "max_model_len": served.get("max_model_len"), "prefill": prefill}
    return points, {**facts, "counter_lag": lag}


async def _counter_lag(
    session: Any,
    base: str,
    body: Callable[[int, int], Callable[[], dict[str, Any]]],
    counters: NvmlCounters,
    idle_power_w: float,
    progress: Callable[[str], None],
) -> dict[str, Any] | None:
    """The energy counter's lag (``lag.py``): bursts of 16 requests of 64 tokens on the idle server; None
    (said) where no burst showed above idle."""
    burst = completion_bursts(session, base, body(16, 64), in_flight=16)

    def joules() -> float:
        return sum(counters.read_now().values())

    try:
        estimate = await probe_counter_lag(burst, joules, idle_power_w)
    except ValueError as exc:
        progress(f"counter lag not measured ({exc}); the profile has no counter_lag_s")
        return None
    progress(
        f"counter lag: {1000 * estimate.lag_s:.0f} ms (rising edges "
        f"{', '.join(f'{1000 * d:.0f}' for d in estimate.rise_delays_s)} ms; falling "
        f"{', '.join(f'{1000 * d:.0f}' for d in estimate.fall_delays_s)} ms)"
    )
    lag_s = estimate.meter_lag_s
    if lag_s != estimate.lag_s:
        progress(f"counter lag {1000 * estimate.lag_s:.0f} ms read as {1000 * lag_s:.0f} ms (0-5 s)")
    return {
        "lag_s": lag_s,
        "rise_delays_s": list(estimate.rise_delays_s),
        "fall_delays_s": list(estimate.fall_delays_s),
    }


def _fit_prompt(prompt_tokens: int, max_model_len: object) -> int:
    """The prefill point's prompt length, inside the served context (one token left to generate)."""
    if isinstance(max_model_len, int) and max_model_len > 1:
        return min(prompt_tokens, max_model_len - 1)
    return prompt_tokens


async def _prefill_point(
    session: Any,
    probe: Any,
    base: str,
    body: Callable[[int, int], Callable[[], dict[str, Any]]],
    *,
    prompt_tokens: int,
    concurrency: int,
    warmup_s: float,
    min_seconds: float,
    counters: NvmlCounters,
    idle_power_w: float,
    progress: Callable[[str], None],
) -> dict[str, Any] | None:
    """The prefill measurement, or None (said) where it cannot be made: the sweep's points are kept."""
    try:
        run = await _closed_loop(
            session,
            probe,
            base,
            body(prompt_tokens, 1),
            concurrency=concurrency,
            warmup_s=warmup_s,
            min_seconds=min_seconds,
            counters=counters,
            metric="vllm:prompt_tokens_total",
        )
    except RuntimeError as exc:
        progress(f"prefill point not measured ({exc}); the profile has no prefill_joules_per_token")
        return None
    if run.tokens <= 0:
        progress(
            "prefill point not measured (the server counted no prompt tokens); no prefill_joules_per_token"
        )
        return None
    point = prefill_point(run.window, run.tokens, idle_power_w, concurrency, prompt_tokens)
    if point["joules_per_token"] <= 0:
        progress(f"prefill point not kept: {point['joules_per_token']:.4g} J per prompt token above idle")
        return None
    progress(
        f"prefill: {point['prompt_tokens_per_s']:.0f} prompt tok/s at {concurrency} in flight, "
        f"{point['power_w']:.0f} W: {1000 * point['joules_per_token']:.2f} J per 1k prompt tokens above idle"
    )
    return point


def prefill_point(
    window: EnergyWindow, prompt_tokens: int, idle_power_w: float, concurrency: int, prompt_len: int
) -> dict[str, Any]:
    """The prefill measurement: energy above idle per prompt token over the window."""
    return {
        "joules_per_token": (window.joules - idle_power_w * window.seconds) / prompt_tokens,
        "prompt_tokens_per_s": prompt_tokens / window.seconds,
        "power_w": window.joules / window.seconds,
        "concurrency": concurrency,
        "prompt_tokens": prompt_len,
        "seconds": window.seconds,
    }

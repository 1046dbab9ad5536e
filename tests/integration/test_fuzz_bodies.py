"""Property-based: whatever body a client sends, ecobatch answers a 4xx naming the problem (or serves
it), never a 5xx; a bad body never joins a batch and never harms the valid request sent beside it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecobatch.config import load_settings
from ecobatch.fields import KNOWN
from ecobatch.serving.app import create_app
from tests.integration.helpers import metric

#: bodies per run: 300 in CI; benchmarks/reliability.py fuzz sets more
EXAMPLES = int(os.environ.get("ECOBATCH_FUZZ_EXAMPLES", "300"))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_names = st.sampled_from(sorted(KNOWN["chat"] | KNOWN["completion"] | {"role", "content", "bogus", ""}))
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "robot", 3]), "content": _values}
)
bodies = st.one_of(
    st.dictionaries(_names, _values, max_size=6),
    st.dictionaries(_names, _values, max_size=4).map(
        lambda d: {**d, "messages": [{"role": "user", "content": "x"}]}
    ),
    st.builds(
        lambda m, extra: {"messages": m, **extra},
        st.lists(_message, max_size=3),
        st.dictionaries(_names, _values, max_size=3),
    ),
    st.builds(lambda p, extra: {"prompt": p, **extra}, _values, st.dictionaries(_names, _values, max_size=3)),
    _values,
)


async def test_any_body_gets_a_4xx_or_a_200_and_the_batchmate_is_unharmed(aiohttp_client: Any) -> None:
    app_settings = load_settings(
        None, {"backend.sim_time_scale": 0.0, "batching.window_min_ms": 0.0, "batching.window_max_ms": 5.0}
    )
    client = await aiohttp_client(create_app(app_settings))
    good = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
    seen: dict[str, int] = {"200": 0, "4xx": 0, "sequences": 0}
    loop = asyncio.get_running_loop()  # hypothesis drives examples from a thread; the app runs here

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def check(body: Any, path: str) -> None:
        async def both() -> None:
            raw = json.dumps(body).encode()
            fuzzed, mate = await asyncio.gather(
                client.post(path, data=raw, headers={"Content-Type": "application/json"}),
                client.post("/v1/chat/completions", json=good),
            )
            assert fuzzed.status < 500, (body, await fuzzed.text())
            if fuzzed.status != 200:
                error = (await fuzzed.json())["error"]
                assert error["message"] and error["type"] == "invalid_request_error", error
                seen["4xx"] += 1
            else:
                seen["200"] += 1
                seen["sequences"] += len((await fuzzed.json())["choices"])
            assert mate.status == 200, await mate.text()
            assert (await mate.json())["usage"]["completion_tokens"] == 3
            seen["sequences"] += 1

        asyncio.run_coroutine_threadsafe(both(), loop).result(timeout=30)

    await asyncio.to_thread(check)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "ecobatch_batch_size_sum") == seen["sequences"], "a refused body joined a batch"
    assert seen["4xx"] > EXAMPLES // 3 and seen["200"] > 0, seen
    if os.environ.get("ECOBATCH_FUZZ_REPORT"):  # benchmarks/reliability.py fuzz
        Path(os.environ["ECOBATCH_FUZZ_REPORT"]).write_text(
            json.dumps({"bodies": EXAMPLES, **seen}, indent=1)
        )


async def test_a_body_nested_past_the_decoders_depth_is_a_400_not_a_500(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(load_settings(None, {"backend.sim_time_scale": 0.0})))
    for depth in (500, 3000):  # inside the decoder's depth (the prompt's check answers), and past it
        raw = '{"prompt": ' + "[" * depth + '"x"' + "]" * depth + "}"
        resp = await client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400, (depth, await resp.text())
        assert (await resp.json())["error"]["type"] == "invalid_request_error"

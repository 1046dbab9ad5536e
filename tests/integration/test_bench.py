"""`ecobatch bench` against the proxy (simulated backend) and a second target with the same arrivals."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ecobatch.config import DEFAULT_PROFILES, load_settings
from ecobatch.profile import load_profile
from ecobatch.serving.app import create_app
from ecobatch.testing.sim_vllm import SimVllm
from ecobatch.tools.bench import add_arguments, bench, build_arrivals, run_cli
from ecobatch.tools.bench.client import run_arrivals
from ecobatch.tools.bench.energy import receipts
from ecobatch.tools.bench.report import table
from tests.integration.helpers import serve_in_thread


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.command_line = "ecobatch bench " + " ".join(argv)
    return args


async def test_the_same_arrivals_go_to_each_target_and_ecobatch_reports_its_joules(
    aiohttp_server: Any,
) -> None:
    fast = await aiohttp_server(create_app(load_settings(None, {"backend.sim_time_scale": 0.0})))
    slow = await aiohttp_server(create_app(load_settings(None, {"backend.sim_time_scale": 0.02})))
    args = parse(
        "--url", str(fast.make_url("")), "--rate", "40", "--requests", "60",
        "--output-tokens", "choice:4,8", "--stream", "--quiet", "--cooldown-s", "0",
    )  # fmt: skip
    arrivals = build_arrivals(args)
    summaries, outcomes = await bench(
        [("fast", str(fast.make_url("")).rstrip("/")), ("slow", str(slow.make_url("")).rstrip("/"))],
        arrivals,
        args,
    )
    for s, outs in zip(summaries, outcomes, strict=True):
        assert s["requests"] == s["ok"] == 60, s
        assert s["completion_tokens"] == sum(a.output_tokens for a in arrivals)
        assert s["ttft_s"]["p50"] is not None and s["itl_s"]["p50"] is not None
        reported = s["energy"]["ecobatch"]
        assert reported["sources"] == ["model"] and reported["settled_requests"] == 60
        assert reported["attributed_joules"] > 0
        assert [o.sent_s for o in outs] == [a.at_s for a in arrivals]
        # every request's receipt, read back by its id: settled, modelled here, and together the joules
        # ecobatch's counters attributed over the phase
        assert all(o.receipt is not None and o.receipt["status"] == "settled" for o in outs)
        assert {o.receipt["source"] for o in outs if o.receipt} == {"model"}
        total = sum(o.receipt["energy_joules"] for o in outs if o.receipt)
        assert abs(total - reported["attributed_joules"]) <= 1e-6 * reported["attributed_joules"]
    assert summaries[1]["latency_s"]["p50"] > summaries[0]["latency_s"]["p50"]
    assert summaries[0]["energy"]["source"] == "none"
    (row,) = [line for line in table(summaries).splitlines() if "ecobatch: attributed" in line]
    assert row.count("(model: MODELLED)") == 2, row  # a modelled figure is never shown bare


def test_the_cli_writes_a_json_report_and_errors_by_status(tmp_path: Path) -> None:
    url = serve_in_thread(
        create_app(load_settings(None, {"backend.sim_time_scale": 0.0, "batching.max_queue": 1}))
    )
    out, records = tmp_path / "r.json", tmp_path / "r.jsonl"
    args = parse(
        "--url", url, "--rate", "200", "--requests", "40", "--output-tokens", "2",
        "--out", str(out), "--records", str(records), "--quiet",
    )  # fmt: skip
    assert run_cli(args) == 0
    report = json.loads(out.read_text())
    target = report["targets"][0]
    assert report["workload"]["requests"] == 40
    assert target["ok"] + sum(target["errors_by_status"].values()) == 40
    assert set(target["errors_by_status"]) == {"429"}, target  # 40 at once into a queue of 1: some shed
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 40
    served = [r for r in rows if r["status"] == 200]
    assert len(served) == target["ok"]
    # a served request's record carries its receipt; a shed one has none to carry
    assert all(r["receipt_status"] == "settled" and r["receipt_joules"] >= 0 for r in served)
    assert all(r["receipt_basis"] and r["receipt_source"] == "model" for r in served)
    shed = [r for r in rows if r["status"] == 429]
    assert shed and all(r["receipt_status"] is None and r["receipt_joules"] is None for r in shed)


async def test_an_ecobatch_whose_metrics_are_on_another_port_is_not_read_as_zero_joules(
    aiohttp_server: Any,
) -> None:
    settings = load_settings(None, {"backend.sim_time_scale": 0.0, "server.metrics_port": 0})
    server = await aiohttp_server(create_app(settings))
    url = str(server.make_url("")).rstrip("/")
    args = parse("--url", url, "--rate", "40", "--requests", "5", "--output-tokens", "2", "--quiet")
    summaries, _ = await bench([("eco", url)], build_arrivals(args), args)
    energy = summaries[0]["energy"]
    assert "ecobatch" not in energy, energy
    assert "/metrics failed" in energy["ecobatch_unreadable"]
    (row,) = [line for line in table(summaries).splitlines() if "ecobatch: attributed" in line]
    assert "—" in row


async def test_receipts_are_asked_again_while_pending_and_a_missing_or_unreadable_one_says_so(
    aiohttp_server: Any,
) -> None:
    seen: list[tuple[str, str | None]] = []

    async def energy(request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        seen.append((request_id, request.headers.get("Authorization")))
        if request_id == "gone":
            return web.json_response({"error": {"message": "no energy receipt"}}, status=404)
        if request_id == "broken":
            return web.Response(status=500, text="boom")
        if request_id == "late" and sum(1 for i, _ in seen if i == "late") >= 3:
            return web.json_response({"id": "late", "status": "settled", "energy_joules": 7.0})
        return web.json_response({"id": request_id, "status": "pending", "provisional_joules": 3.0})

    app = web.Application()
    app.router.add_get("/ecobatch/energy/{request_id}", energy)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    got = await receipts(url, ["late", "gone", "broken", "late", "stuck"], "k1", wait_s=0.5, poll_s=0.02)
    assert got["late"] == {"id": "late", "status": "settled", "energy_joules": 7.0}  # the third asking
    assert got["stuck"]["status"] == "pending"  # the wait ran out: it says so
    assert got["gone"] == {"status": "missing"}
    assert got["broken"] == {"status": "unreadable", "error": "HTTP 500"}
    asked = [i for i, _ in seen]
    assert asked.count("late") == 3 and asked.count("gone") == 1 and asked.count("broken") == 1
    assert asked.count("stuck") > 3
    assert {key for _, key in seen} == {"Bearer k1"}


async def test_a_target_that_is_not_ecobatch_gets_no_receipts(aiohttp_server: Any) -> None:
    """vLLM direct: ecobatch's receipt endpoint is not asked for, and every receipt column is empty."""
    server = await aiohttp_server(SimVllm(load_profile(DEFAULT_PROFILES["continuous"])).app())
    url = str(server.make_url("")).rstrip("/")
    args = parse("--url", url, "--rate", "40", "--requests", "4", "--output-tokens", "2", "--quiet")
    _, outcomes = await bench([("direct", url)], build_arrivals(args), args)
    assert [o.status for o in outcomes[0]] == [200] * 4
    assert all(o.receipt is None for o in outcomes[0])


@pytest.mark.parametrize("flag", ["--warmup-s", "--cooldown-s"])
@pytest.mark.parametrize("seconds", ["-1", "nan"])
def test_a_negative_or_nan_warm_up_or_cool_down_is_refused_naming_the_flag(flag: str, seconds: str) -> None:
    args = parse("--url", "http://127.0.0.1:9", "--requests", "1", flag, seconds, "--quiet")
    with pytest.raises(ValueError, match=rf"{flag}=(-1\.0|nan) must be >= 0"):
        run_cli(args)


async def test_the_warm_up_sends_interactive_requests_with_prompts_of_their_own(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--warmup-s: the warm-up's requests start with a word of their own and come from another seed, so
    the engine's prefix cache holds nothing of the phase's prompts; they go as interactive requests."""
    sent: list[tuple[str, int, list[str]]] = []

    async def recording(url: str, arrivals: Any, **kwargs: Any) -> Any:
        sent.append((kwargs["salt"], kwargs["seed"], [a.tier for a in arrivals]))
        return await run_arrivals(url, arrivals, **kwargs)

    monkeypatch.setattr("ecobatch.tools.bench.run_arrivals", recording)
    server = await aiohttp_server(SimVllm(load_profile(DEFAULT_PROFILES["continuous"])).app())
    url = str(server.make_url("")).rstrip("/")
    args = parse(
        "--url", url, "--rate", "40", "--requests", "12", "--output-tokens", "2", "--flex-share", "1",
        "--warmup-s", "0.1", "--cooldown-s", "0", "--quiet",
    )  # fmt: skip
    await bench([("direct", url)], build_arrivals(args), args)
    (warm_salt, warm_seed, warm_tiers), (phase_salt, phase_seed, phase_tiers) = sent
    assert warm_salt != phase_salt and warm_seed != phase_seed
    assert warm_tiers and set(warm_tiers) == {"interactive"} and set(phase_tiers) == {"flex"}


async def test_a_pending_receipt_keeps_its_answer_when_a_later_read_fails_or_stalls_past_the_wait(
    aiohttp_server: Any,
) -> None:
    """After the first round every asking ends at the wait's deadline, and a receipt that could not be read
    again is not turned from pending into unreadable."""
    asked: list[str] = []

    async def energy(request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        asked.append(request_id)
        if asked.count(request_id) == 1:
            return web.json_response({"id": request_id, "status": "pending", "provisional_joules": 3.0})
        if request_id == "fails":
            return web.Response(status=500, text="boom")
        await asyncio.sleep(60)  # "stalls": never answers within the wait
        return web.json_response({"id": request_id, "status": "settled", "energy_joules": 7.0})

    app = web.Application()
    app.router.add_get("/ecobatch/energy/{request_id}", energy)
    server = await aiohttp_server(app)
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await receipts(str(server.make_url("")).rstrip("/"), ["fails", "stalls"], wait_s=0.5, poll_s=0.05)
    assert loop.time() - started < 5.0, "the wait's deadline bounds the later rounds"
    pending = {"status": "pending", "provisional_joules": 3.0}
    assert got == {"fails": {"id": "fails", **pending}, "stalls": {"id": "stalls", **pending}}
    assert asked.count("fails") >= 2 and asked.count("stalls") >= 2

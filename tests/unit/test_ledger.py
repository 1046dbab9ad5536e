"""The energy ledger: every interval's joules go to requests (by the tokens they processed in it), to
idle, or to other clients' work, and nothing is lost or invented."""

from __future__ import annotations

import asyncio
import random

import pytest

from ecobatch.clock import FakeClock
from ecobatch.domain import Usage
from ecobatch.energy.attribution import IntervalSplit
from ecobatch.energy.ledger import COUNTER_STEP_S, Ledger, LedgerReports, SettledRequest


def ledger_on(
    clock: FakeClock,
    *,
    idle_power_w: float = 0.0,
    prefill_weight: float = 1.0,
    reports: LedgerReports | None = None,
) -> Ledger:
    return Ledger(
        source="nvml", prefill_weight=prefill_weight, idle_power_w=idle_power_w, clock=clock, reports=reports
    )


def collect() -> tuple[dict[str, SettledRequest], list[IntervalSplit], LedgerReports]:
    """Where a ledger built with the reports returned reports to: its settled requests (each once) and
    its interval splits."""
    settled: dict[str, SettledRequest] = {}
    splits: list[IntervalSplit] = []

    def on_settled(batch: list[SettledRequest]) -> None:
        for s in batch:
            assert s.request_id not in settled, "settled twice"
            settled[s.request_id] = s

    return settled, splits, LedgerReports(settled=on_settled, interval=splits.append)


async def test_equal_work_gets_equal_joules_whatever_else_is_in_flight() -> None:
    """With GPU energy exactly proportional to the tokens processed, each request gets exactly its own
    tokens' energy: alone, or beside five others that come and go."""
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = ledger_on(clock, prefill_weight=0.5, reports=reports)
    joules_per_token = 0.25
    rng = random.Random(7)
    plan = {"alone": (0, 20, 3), "crowded": (40, 60, 3)}  # (start tick, end tick, tokens per tick)
    plan |= {
        f"other{i}": (35 + rng.randrange(10), 50 + rng.randrange(30), rng.randrange(1, 9)) for i in range(5)
    }
    spans: dict[str, object] = {}
    expected = {name: 0.0 for name in plan}
    t_last = clock.now()
    for tick in range(100):
        await clock.advance(0.1)
        energy = 0.0
        for name, (start, end, per_tick) in plan.items():
            span = spans.get(name)
            if tick == start:
                spans[name] = ledger.begin(name)
            elif span is not None and start < tick < end:
                span.generated(per_tick)  # type: ignore[attr-defined]
                work = per_tick + (0.5 * 10 if tick == start + 1 else 0.0)  # the 10-token prefill first
                energy += joules_per_token * work
                expected[name] += joules_per_token * work
            elif span is not None and tick == end:
                made = per_tick * (end - start - 1)
                span.end(Usage(10, made))  # type: ignore[attr-defined]
        ledger.add_interval(t_last, clock.now(), energy)
        t_last = clock.now()
    assert set(settled) == set(plan)
    for name, s in settled.items():
        assert s.joules == pytest.approx(expected[name], rel=1e-9), name
    assert settled["alone"].joules == pytest.approx(settled["crowded"].joules, rel=1e-9)


async def test_a_non_streaming_request_has_its_prompt_at_the_start_and_its_tokens_spread_evenly() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = ledger_on(clock, reports=reports)
    r = ledger.begin("r")  # [0, 1.0]: 100 tokens, no progress reported
    await clock.advance(0.5)
    s = ledger.begin("s")  # [0.5, 1.0]: 50 tokens
    await clock.advance(0.5)
    r.end(Usage(0, 100))
    s.end(Usage(0, 50))
    for k in range(4):  # four quarters of 100 J each
        ledger.add_interval(0.25 * k, 0.25 * (k + 1), 100.0)
    await clock.advance(0.1)
    ledger.add_interval(1.0, 1.1, 0.0)
    # quarters 1-2: r alone; quarters 3-4: 25 tokens each
    assert settled["r"].joules == pytest.approx(300.0)
    assert settled["s"].joules == pytest.approx(100.0)


def queued(prefill_tokens_per_s: float | None) -> tuple[FakeClock, dict[str, SettledRequest], Ledger]:
    """A ledger (prompt weight 1, no idle) whose prefill queue runs at ``prefill_tokens_per_s``, its
    fake clock, and where its settled requests land."""
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = Ledger(
        source="nvml",
        prefill_weight=1.0,
        clock=clock,
        reports=reports,
        prefill_tokens_per_s=prefill_tokens_per_s,
    )
    return clock, settled, ledger


async def two_prompts_sent_together(prefill_tokens_per_s: float | None) -> dict[str, SettledRequest]:
    """a and b, non-streamed, both from 0 to 0.3 s with 1,000 prompt tokens and 10 generated; three
    intervals of 10 J."""
    clock, settled, ledger = queued(prefill_tokens_per_s)
    a, b = ledger.begin("a"), ledger.begin("b")
    await clock.advance(0.3)
    a.end(Usage(1000, 10))
    b.end(Usage(1000, 10))
    for k in range(3):
        ledger.add_interval(0.1 * k, 0.1 * (k + 1), 10.0)
    ledger.flush()
    return settled


async def test_prompts_sent_together_are_prefilled_one_after_another_at_the_measured_rate() -> None:
    # 10,000 prompt tokens/s: a's prefill [0, 0.1), then its 10 tokens over [0.1, 0.3); b's prefill
    # waits for a's: [0.1, 0.2), then its 10 tokens over [0.2, 0.3)
    settled = await two_prompts_sent_together(10_000.0)
    # [0, 0.1): a's prompt alone; [0.1, 0.2): a's 5 tokens beside b's 1,000 prompt tokens;
    # [0.2, 0.3): a's 5 tokens beside b's 10
    assert settled["a"].joules == pytest.approx(10.0 + 10.0 * 5 / 1005 + 10.0 * 5 / 15)
    assert settled["b"].joules == pytest.approx(10.0 * 1000 / 1005 + 10.0 * 10 / 15)


async def test_without_a_measured_prefill_rate_the_prompts_fall_at_the_start() -> None:
    settled = await two_prompts_sent_together(None)
    assert settled["a"].joules == pytest.approx(15.0)
    assert settled["b"].joules == pytest.approx(15.0)


async def test_a_streamed_request_keeps_its_token_times_and_takes_its_turn_in_the_prefill_queue() -> None:
    # 10,000 prompt tokens/s; s (streamed, first chunk at 0.05 s) and p (plain) both send 1,000 prompt
    # tokens at 0: s's prefill ended by its first chunk, so p's runs [0.05, 0.15), then its 10 tokens
    clock, settled, ledger = queued(10_000.0)
    s, p = ledger.begin("s"), ledger.begin("p")
    await clock.advance(0.05)
    s.generated(1)
    await clock.advance(0.25)
    s.generated(9)
    s.end(Usage(1000, 10))
    p.end(Usage(1000, 10))
    for t0, t1 in ((0.0, 0.05), (0.05, 0.15), (0.15, 0.3)):
        ledger.add_interval(t0, t1, 10.0)
    ledger.flush()
    # [0, 0.05): s's prompt and first token, p waits; [0.05, 0.15): s's 9 later tokens over [0.05, 0.3)
    # put 3.6 here beside p's 1,000 prompt tokens; [0.15, 0.3): s's 5.4 beside p's 10
    assert settled["s"].joules == pytest.approx(10.0 + 10.0 * 3.6 / 1003.6 + 10.0 * 5.4 / 15.4)
    assert settled["p"].joules == pytest.approx(10.0 * 1000 / 1003.6 + 10.0 * 10 / 15.4)


async def test_a_prefill_the_queue_could_not_finish_by_the_requests_end_ran_before_it() -> None:
    # 1,000 prompt tokens/s: a's and b's 1,000-token prompts would take 1 s each, but both ended at
    # 0.2 s: each was prefilled by then, so each has its prompt and its output over [0, 0.2)
    clock, settled, ledger = queued(1000.0)
    a, b = ledger.begin("a"), ledger.begin("b")
    await clock.advance(0.2)
    a.end(Usage(1000, 10))
    b.end(Usage(1000, 10))
    # then c (100 prompt tokens: 0.1 s) and d (streamed, no prompt, 20 tokens at 0.35 s) from 0.3 s to
    # 0.5 s: the queue is free since a's and b's end, so c's prefill is [0.3, 0.4), not pushed past its end
    await clock.advance(0.1)
    c, d = ledger.begin("c"), ledger.begin("d")
    await clock.advance(0.05)
    d.generated(20)
    await clock.advance(0.15)
    c.end(Usage(100, 0))
    d.end(Usage(0, 20))
    for k in range(5):
        ledger.add_interval(0.1 * k, 0.1 * (k + 1), 10.0)
    ledger.flush()
    assert settled["a"].joules == pytest.approx(10.0)
    assert settled["b"].joules == pytest.approx(10.0), "a prefill cut at an interval's edge still counts"
    # [0.3, 0.4): c's 100 prompt tokens beside d's 20 tokens; [0.4, 0.5): no tokens: by in-flight time
    assert settled["c"].joules == pytest.approx(10.0 * 100 / 120 + 5.0)
    assert settled["d"].joules == pytest.approx(10.0 * 20 / 120 + 5.0)


def test_a_prefill_rate_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
        Ledger(source="nvml", prefill_weight=1.0, prefill_tokens_per_s=0.0)


async def test_overlapping_requests_conserve_the_counter_with_failures_and_idle() -> None:
    """Σ per request + idle + unattributed = Σ interval joules, whatever the overlap and however a
    request ends (streamed, plain, failed, its client gone)."""
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = ledger_on(clock, idle_power_w=120.0, reports=reports)
    rng = random.Random(3)
    open_spans = []
    counter = 0.0
    t_last = 0.0
    started = 0
    for _ in range(400):
        await clock.advance(rng.uniform(0.005, 0.05))
        if rng.random() < 0.2:
            open_spans.append(ledger.begin(f"r{started}", sequences=rng.randrange(1, 4)))
            started += 1
        for span in list(open_spans):
            roll = rng.random()
            if roll < 0.3:
                span.generated(rng.randrange(1, 5))
            elif roll < 0.36:
                outcome = rng.choice(["ok", "failed", "left"])
                usage = Usage(rng.randrange(50), rng.randrange(200)) if outcome != "failed" else None
                span.end(usage, delivered=outcome != "left")
                open_spans.remove(span)
        if rng.random() < 0.3:  # the counter moves now and then, by whatever the GPU spent
            joules = rng.uniform(0, 60)
            counter += joules
            ledger.add_interval(t_last, clock.now(), joules)
            t_last = clock.now()
    for span in open_spans:
        span.end(None)
    await clock.advance(0.1)
    ledger.add_interval(t_last, clock.now(), 5.0)
    counter += 5.0
    ledger.flush()
    assert len(settled) == started
    attributed = sum(s.joules for s in settled.values())
    totals = ledger.totals
    assert attributed + totals.idle_joules + totals.unattributed_joules == pytest.approx(counter, rel=1e-9)
    assert sum(s.joules for s in splits) == pytest.approx(counter, rel=1e-9)
    assert all(s.joules >= 0 for s in settled.values())
    assert ledger.pending_requests == 0


async def test_a_failed_request_leaves_no_open_span_and_idle_keeps_counting() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = ledger_on(clock, idle_power_w=100.0, reports=reports)
    span = ledger.begin("fails")
    span.generated(3)
    await clock.advance(0.5)
    span.end(None, delivered=False)  # the engine failed: usage unknown
    span.end(Usage(1, 1))  # a second end (a finally block) changes nothing
    ledger.add_interval(0.0, 1.0, 400.0)  # busy 0.5 s, idle 0.5 s
    assert settled["fails"].joules == pytest.approx(400.0 - 100.0), "all above idle power is its"
    assert settled["fails"].base_joules == pytest.approx(50.0), "idle power while it ran"
    assert settled["fails"].delivered is False
    for k in range(1, 4):
        ledger.add_interval(float(k), float(k + 1), 100.0)
    assert ledger.pending_requests == 0
    assert ledger.totals.idle_joules == pytest.approx(100.0 + 300.0), "idle power × all the time"
    assert ledger.totals.base_joules == pytest.approx(50.0), "of which while ours ran"


async def test_energy_while_none_of_ours_runs_is_idle_up_to_idle_power_then_other_work() -> None:
    clock = FakeClock()
    _, splits, reports = collect()
    ledger = ledger_on(clock, idle_power_w=122.0, reports=reports)
    ledger.add_interval(0.0, 1.0, 480.0)  # another client decoding on the same GPU
    ledger.add_interval(1.0, 2.0, 100.0)  # below idle power: all of it idle
    assert (splits[0].idle_joules, splits[0].unattributed_joules) == pytest.approx((122.0, 358.0))
    assert (splits[1].idle_joules, splits[1].unattributed_joules) == pytest.approx((100.0, 0.0))


async def test_a_request_settles_only_once_the_counter_has_passed_its_end() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = ledger_on(clock, reports=reports)
    await clock.advance(1.0)
    span = ledger.begin("r")
    ledger.add_interval(0.0, 1.0, 10.0)
    await clock.advance(0.05)
    span.end(Usage(1, 1))
    assert settled == {}
    ledger.add_interval(1.0, 1.1, 20.0)
    assert settled["r"].joules == pytest.approx(20.0)


async def test_an_interval_waits_for_every_request_in_it_to_end() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = ledger_on(clock, reports=reports)
    short, long_ = ledger.begin("short"), ledger.begin("long")
    await clock.advance(0.1)
    short.end(Usage(0, 10))
    ledger.add_interval(0.0, 0.2, 30.0)
    assert settled == {}, "the long request's share of the interval is not known yet"
    await clock.advance(0.2)
    long_.end(Usage(0, 30))
    ledger.add_interval(0.2, 0.4, 30.0)
    # interval 1: short 10 tokens, long 30 × (0.2 / 0.3) = 20 tokens
    assert settled["short"].joules == pytest.approx(10.0)
    assert settled["long"].joules == pytest.approx(20.0 + 30.0)


async def test_a_modelled_ledger_charges_the_profile_per_token_and_idle_power() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = Ledger(
        source="model",
        prefill_weight=1.0,
        idle_power_w=10.0,
        clock=clock,
        active_model=lambda tokens, concurrency: tokens * (2.0 if concurrency < 1.5 else 1.0),
        reports=reports,
    )
    a = ledger.begin("a")
    await clock.advance(0.5)
    a.end(Usage(5, 10))
    await clock.advance(0.5)
    ledger.add_interval(0.0, 1.0, None)
    b, c = ledger.begin("b"), ledger.begin("c")
    await clock.advance(0.5)
    b.end(Usage(0, 10))
    c.end(Usage(0, 30))
    ledger.add_interval(1.0, 2.0, None)
    # the profile's J/token include the idle power while busy: a request is charged what is above it
    assert settled["a"].joules == pytest.approx(20.0 - 10.0 * 0.5)  # 10 tokens at 2 J (one in flight)
    # two in flight at 1 J/token for 0.5 s: 40 J, less 5 J of idle power, split 10:30
    assert (settled["b"].joules, settled["c"].joules) == pytest.approx((8.75, 26.25))
    assert ledger.totals.idle_joules == pytest.approx(10.0 * 2)
    assert settled["a"].source == "model"


async def test_the_mean_concurrency_of_a_request_is_reported_at_its_end() -> None:
    clock = FakeClock()
    ledger = ledger_on(clock)
    a = ledger.begin("a", sequences=1)
    await clock.advance(1.0)
    b = ledger.begin("b", sequences=3)
    await clock.advance(1.0)
    b.end(Usage())
    assert a.end(Usage()) == pytest.approx((1 * 1.0 + 4 * 1.0) / 2.0)


async def test_while_ours_run_they_take_at_most_the_power_limit_the_rest_is_other_work() -> None:
    """A 30 s counter interval (dcgm-exporter's default), another client at 400 W throughout, one of our
    requests for 1 s: ours cannot have drawn more than the 700 W limit for that second."""
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = Ledger(
        source="dcgm", prefill_weight=1.0, idle_power_w=122.0, max_power_w=700.0, clock=clock, reports=reports
    )
    await clock.advance(10.0)
    span = ledger.begin("ours")
    await clock.advance(1.0)
    span.end(Usage(10, 50))
    await clock.advance(19.0)
    ledger.add_interval(0.0, 30.0, 12_000.0)
    # at most the limit above idle while busy, and one counter step's slack at the limit
    assert settled["ours"].joules == pytest.approx(700.0 - 122.0 + 700.0 * COUNTER_STEP_S)
    assert splits[0].idle_joules == pytest.approx(122.0 * 30)
    assert splits[0].unattributed_joules == pytest.approx(12_000.0 - 753.0 - 122.0 * 30)


async def test_a_stepping_counter_near_the_power_limit_does_not_push_ours_into_other_work() -> None:
    """Prefill at the 700 W limit, ours in flight throughout; the counter stepped so that a 100 ms
    interval reports 120 ms of energy and the next 80 ms: all of it above idle is ours."""
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = Ledger(
        source="nvml", prefill_weight=1.0, idle_power_w=120.0, max_power_w=700.0, clock=clock, reports=reports
    )
    span = ledger.begin("prefill")
    await clock.advance(0.2)
    span.end(Usage(4000, 1))
    ledger.add_interval(0.0, 0.1, 700.0 * 0.12)
    ledger.add_interval(0.1, 0.2, 700.0 * 0.08)
    ledger.add_interval(0.2, 0.3, 12.0)
    assert sum(s.unattributed_joules for s in splits) == pytest.approx(0.0)
    assert settled["prefill"].joules == pytest.approx(700.0 * 0.2 - 120.0 * 0.2)


async def test_a_gap_in_the_counter_settles_its_requests_as_incomplete() -> None:
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = ledger_on(clock, reports=reports)
    lost = ledger.begin("lost")
    await clock.advance(0.5)
    lost.end(Usage(1, 5))
    ledger.add_gap(0.0, 1.0)
    measured = ledger.begin("measured")
    await clock.advance(1.0)
    measured.end(Usage(1, 5))
    ledger.add_interval(1.0, 2.0, 40.0)
    assert (settled["lost"].complete, settled["lost"].joules) == (False, 0.0)
    assert (settled["measured"].complete, settled["measured"].joules) == (True, pytest.approx(40.0))
    assert ledger.totals.unmeasured_s == pytest.approx(1.0)
    assert [s.gap for s in splits] == [True, False]


async def test_a_failing_observer_neither_stops_nor_repeats_the_accounting() -> None:
    clock = FakeClock()
    calls: list[str] = []

    def flaky(batch: list[SettledRequest]) -> None:
        calls.extend(s.request_id for s in batch)
        if len(calls) == 1:
            raise ValueError("a metric refused the value")

    ledger = ledger_on(clock, reports=LedgerReports(settled=flaky))
    a = ledger.begin("a")
    await clock.advance(0.5)
    a.end(Usage(0, 1))
    ledger.add_interval(0.0, 1.0, 10.0)  # settles a: its observer fails
    b = ledger.begin("b")
    await clock.advance(1.0)
    b.end(Usage(0, 1))
    ledger.add_interval(1.0, 2.0, 10.0)  # settles b: reported, a not again
    assert calls == ["a", "b"]
    assert ledger.totals.settled_request_joules == pytest.approx(20.0)  # each its interval's 10 J
    assert ledger.pending_requests == 0


async def test_a_request_that_ended_as_an_interval_began_takes_none_of_it() -> None:
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = ledger_on(clock, idle_power_w=300.0, reports=reports)
    r = ledger.begin("r")
    await clock.advance(1.0)
    r.end(Usage(0, 10))
    ledger.add_interval(0.0, 1.0, 500.0)
    await clock.advance(1.0)
    ledger.add_interval(1.0, 2.0, 700.0)  # another client, after ours ended
    assert settled["r"].joules == pytest.approx(500.0 - 300.0)
    assert (splits[1].idle_joules, splits[1].unattributed_joules) == pytest.approx((300.0, 400.0))


async def test_a_backlog_behind_a_long_request_settles_a_bounded_number_of_intervals_per_turn() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock, settle_budget=10, reports=reports)
    long_ = ledger.begin("long")
    t = 0.0
    for i in range(100):  # short requests come and go while the long one runs
        span = ledger.begin(f"s{i}")
        await clock.advance(0.1)
        span.end(Usage(1, 1))
        ledger.add_interval(t, clock.now(), 1.0)
        t = clock.now()
    assert ledger.pending_intervals == 100 and settled == {}
    long_.end(Usage(1, 100))
    assert ledger.pending_intervals == 90, "one turn settles at most settle_budget intervals"
    for _ in range(20):
        await asyncio.sleep(0)
    assert ledger.pending_intervals == 0
    await clock.advance(0.1)
    ledger.add_interval(t, clock.now(), 0.0)
    assert len(settled) == 101
    assert sum(s.joules for s in settled.values()) == pytest.approx(100.0)


async def test_a_busy_interval_reports_a_bounded_number_of_requests_per_turn_and_loses_none() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock, report_budget=4, reports=reports)
    for i in range(10):
        span = ledger.begin(f"r{i}")
        span.end(Usage(1, 1))
    await clock.advance(0.1)
    ledger.add_interval(0.0, clock.now(), 10.0)
    assert len(settled) == 4, "one turn reports at most report_budget requests"
    assert ledger.pending_requests == 6
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(settled) == 10 and ledger.pending_requests == 0
    assert sum(s.joules for s in settled.values()) == pytest.approx(10.0)
    assert ledger.totals.settled_request_joules == pytest.approx(10.0)


async def test_flush_reports_everything_at_once_whatever_the_budget() -> None:
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = Ledger(source="nvml", prefill_weight=1.0, clock=clock, report_budget=2, reports=reports)
    for i in range(6):
        ledger.begin(f"r{i}").end(Usage(1, 1))
    await clock.advance(0.1)
    ledger.add_interval(0.0, clock.now(), 6.0)
    ledger.flush()
    assert len(settled) == 6 and ledger.pending_requests == 0


async def test_an_abandoned_span_takes_no_share_and_is_never_reported() -> None:
    """A request whose connection was refused never ran on these GPUs: its span is dropped, and the
    interval's joules go to the request that did run (and to idle), not to it."""
    clock = FakeClock()
    settled, _, reports = collect()
    ledger = ledger_on(clock, idle_power_w=100.0, reports=reports)
    t0 = clock.now()
    refused = ledger.begin("refused")
    ran = ledger.begin("ran")
    await clock.advance(0.001)
    refused.abandon()
    assert ledger.inflight_sequences == 1
    await clock.advance(0.999)
    ran.end(Usage(4, 16))
    t1 = clock.now()
    ledger.add_interval(t0, t1, 500.0)
    ledger.add_interval(t1, t1 + 0.1, 0.0)  # the meter's next interval: everything up to the end is in
    for _ in range(5):  # reports go out on later turns of the loop
        await asyncio.sleep(0)
    assert set(settled) == {"ran"}
    assert settled["ran"].joules == pytest.approx(400.0), "busy the whole interval: all above idle is its"
    assert ledger.pending_requests == 0


async def test_the_energy_above_idle_just_after_a_request_ends_is_still_its_own() -> None:
    """The counter lags and the power decays after the last token: within ``tail_s`` of its end, the
    above-idle joules go to the request that just ended (by what each was charged), not to other work;
    later, they are other work."""
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = Ledger(
        source="nvml", prefill_weight=1.0, idle_power_w=100.0, clock=clock, tail_s=0.5, reports=reports
    )
    a, b = ledger.begin("a"), ledger.begin("b")
    await clock.advance(1.0)
    a.end(Usage(0, 30))
    b.end(Usage(0, 10))
    ledger.add_interval(0.0, 1.0, 500.0)  # 400 above idle, split 30:10
    assert settled == {}, "not settled until its tail has been measured"
    ledger.add_interval(1.0, 1.4, 80.0)  # 40 J above idle in the tail: 30 to a, 10 to b
    ledger.add_interval(1.4, 1.6, 40.0)  # began inside the tail: its 20 J above idle too
    ledger.add_interval(1.6, 2.0, 100.0)  # past the tail: 60 J above idle is other work
    assert settled["a"].joules == pytest.approx(300.0 + 30.0 + 15.0)
    assert settled["b"].joules == pytest.approx(100.0 + 10.0 + 5.0)
    assert splits[-1].unattributed_joules == pytest.approx(60.0)
    assert sum(s.unattributed_joules for s in splits[:-1]) == 0.0


async def test_a_tail_with_another_clients_work_in_flight_is_other_work() -> None:
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = Ledger(
        source="nvml", prefill_weight=1.0, idle_power_w=100.0, clock=clock, tail_s=0.5, reports=reports
    )
    a = ledger.begin("a")
    await clock.advance(1.0)
    a.end(Usage(0, 30))
    ledger.add_interval(0.0, 1.0, 500.0)
    ledger.add_interval(1.0, 1.4, 200.0, other_sequences=2)
    ledger.add_interval(1.4, 2.0, 60.0)
    assert settled["a"].joules == pytest.approx(400.0)
    assert splits[1].unattributed_joules == pytest.approx(160.0)


async def test_beside_another_clients_sequences_ours_take_their_share_of_sequence_time() -> None:
    """vLLM runs one of ours and three of another client's for the whole interval: ours is charged a
    quarter of the energy above idle, the rest is other work (never idle, never ours)."""
    clock = FakeClock()
    settled, splits, reports = collect()
    ledger = ledger_on(clock, idle_power_w=100.0, reports=reports)
    ours = ledger.begin("ours")
    await clock.advance(1.0)
    ours.end(Usage(10, 50))
    ledger.add_interval(0.0, 1.0, 500.0, other_sequences=3)
    ledger.add_interval(1.0, 1.1, 10.0)  # the counter has passed its end
    assert settled["ours"].joules == pytest.approx(400.0 / 4)
    assert (splits[0].idle_joules, splits[0].unattributed_joules) == pytest.approx((100.0, 300.0))


async def test_idle_power_is_re_estimated_from_quiet_seconds_but_not_from_another_clients_work() -> None:
    clock = FakeClock()
    _, splits, reports = collect()
    ledger = Ledger(
        source="nvml",
        prefill_weight=1.0,
        idle_power_w=120.0,
        clock=clock,
        tail_s=0.5,
        live_idle=True,
        reports=reports,
    )
    t = 0.0
    for _ in range(5):  # the GPU has warmed up: it idles at 140 W, not the 120 W of start-up
        ledger.add_interval(t, t + 1.0, 140.0)
        t += 1.0
    assert ledger.idle.live and ledger.idle_power_w == pytest.approx(140.0)
    for _ in range(10):  # another client works on the engine: its seconds say nothing of idle
        ledger.add_interval(t, t + 1.0, 450.0, other_sequences=4)
        t += 1.0
    assert ledger.idle_power_w == pytest.approx(140.0)
    assert splits[-1].unattributed_joules == pytest.approx(450.0 - 140.0)
    r = ledger.begin("r")  # and none of our own busy or tail time counts
    await clock.advance(t + 1.0 - clock.now())
    r.end(Usage(0, 10))
    ledger.add_interval(t, t + 1.0, 600.0)
    ledger.add_interval(t + 1.0, t + 1.4, 200.0)
    assert ledger.idle_power_w == pytest.approx(140.0)


async def test_a_prompt_token_weighs_the_measured_ratio_at_the_intervals_concurrency() -> None:
    clock = FakeClock()
    seen: list[float] = []

    def weight(concurrency: float) -> float:
        seen.append(concurrency)
        return 0.1 * concurrency

    settled, _, reports = collect()
    ledger = Ledger(source="nvml", prefill_weight=weight, clock=clock, reports=reports)
    a, b = ledger.begin("a", sequences=2), ledger.begin("b", sequences=2)
    await clock.advance(1.0)
    a.end(Usage(100, 0))  # prefill only: 100 prompt tokens at weight 0.4 (4 sequences in flight)
    b.end(Usage(0, 40))
    ledger.add_interval(0.0, 1.0, 80.0)
    ledger.add_interval(1.0, 1.1, 0.0)  # the counter has passed their end
    assert seen[0] == pytest.approx(4.0)
    assert (settled["a"].joules, settled["b"].joules) == pytest.approx((40.0, 40.0))


async def test_a_counter_that_stood_still_is_not_an_idle_reading() -> None:
    """After max_stale_s the meter closes an empty interval: 0 J over a minute says the counter stood
    still, not that the GPU drew nothing."""
    clock = FakeClock()
    ledger = Ledger(source="nvml", prefill_weight=1.0, idle_power_w=130.0, clock=clock, live_idle=True)
    t = 0.0
    for _ in range(5):
        ledger.add_interval(t, t + 1.0, 130.0)
        t += 1.0
    for _ in range(12):
        ledger.add_interval(t, t + 60.0, 0.0)
        t += 60.0
    assert ledger.idle_power_w == pytest.approx(130.0)

"""`ecobatch tune` and `plan` from the command line: `--help`, a recommendation that meets the SLO and the
body that applies it, and `tune --live` measuring the recommendation on a running proxy."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ecobatch.cli import main
from ecobatch.config import load_settings
from ecobatch.serving.app import create_app
from ecobatch.testing.servers import free_port
from tests.integration.helpers import serve_in_thread

PROFILES = Path(__file__).resolve().parents[2] / "configs" / "profiles"


@pytest.mark.parametrize(
    ("command", "must_mention"),
    [
        ("bench", ["--compare", "--arrivals", "--energy"]),
        ("tune", ["--slo-p99-s", "--slo-p99-x-baseline", "--live", "--flex-share", "--budgets-ms"]),
        ("plan", ["--per-month", "--carbon-g-per-kwh", "--pue"]),
    ],
)
def test_each_command_explains_itself(command: str, must_mention: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ecobatch.cli", command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in must_mention:
        assert option in out, f"`ecobatch {command} --help` does not mention {option}"


def test_tune_sweeps_a_budget_through_the_proxys_own_controller_and_prints_the_body_that_applies_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tune.json"
    code = main(
        ["tune", "--rate", "4", "--duration", "60", "--seeds", "1", "--slo-p99-x-baseline", "3",
         "--budgets-ms", "0,100,1000", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    best, base = report["recommended"], report["baseline"]
    assert report["modelled"] is True and report["tier"] == "interactive"
    assert report["slo_p99_s"] == pytest.approx(3 * base["p99_s"])
    assert [c["settings"] for c in report["candidates"]] == [
        {"interactive_budget_ms": b} for b in (0.0, 100.0, 1000.0)
    ]
    feasible = [c for c in report["candidates"] if c["p99_s"] <= report["slo_p99_s"]]
    assert best == min(feasible, key=lambda c: c["joules_per_request"])
    assert best["joules_per_request"] <= base["joules_per_request"], "never worse than vLLM direct"
    printed = capsys.readouterr().out
    assert "ecobatch's run-time controller" in printed
    body = json.loads(printed.split("-d '")[1].split("'")[0])
    assert body == best["settings"]
    assert out.with_suffix(".png").exists() or "no plot" in printed


def test_tune_with_flex_traffic_sweeps_the_flex_budget_and_a_longer_one_saves_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "flex.json"
    code = main(
        ["tune", "--rate", "4", "--duration", "120", "--seeds", "1", "--flex-share", "1",
         "--slo-p99-s", "600", "--budgets-ms", "2000,30000", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["tier"] == "flex"
    short, long = report["candidates"]
    assert long["joules_per_request"] < short["joules_per_request"] < report["baseline"]["joules_per_request"]
    assert short["flex_max_wait_s"] <= 2.0 + 1e-6 and long["flex_max_wait_s"] <= 30.0 + 1e-6


def test_a_flex_budget_below_the_interactive_one_lowers_both_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "flex0.json"
    code = main(
        ["tune", "--rate", "4", "--duration", "30", "--seeds", "1", "--flex-share", "1",
         "--slo-p99-s", "600", "--budgets-ms", "0,2000", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    zero, two = json.loads(out.read_text())["candidates"]
    assert zero["settings"] == {"flex_budget_ms": 0.0, "interactive_budget_ms": 0.0}
    assert zero["label"] == "flex budget 0 ms (interactive too)"
    assert two["settings"] == {"flex_budget_ms": 2000.0}


def test_tune_says_so_when_no_setting_meets_the_slo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["tune", "--rate", "4", "--duration", "30", "--seeds", "1", "--slo-p99-s", "0.01",
         "--budgets-ms", "0", "--out", str(tmp_path / "t.json")]
    )  # fmt: skip
    assert code == 0
    assert "no setting meets p99 <= 0.01 s" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["recommended"] is None


def test_tune_live_applies_the_recommendation_and_sets_the_measurement_beside_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulated backend runs the same timing model as tune's static engine (the A800 profile at
    real time), so on the same arrivals the two must agree closely."""
    monkeypatch.setenv("ECOBATCH_ADMIN_KEYS", "sk-admin")  # the server's keys; tune takes the first
    monkeypatch.delenv("ECOBATCH_ADMIN_KEY", raising=False)
    url = serve_in_thread(create_app(load_settings(None, {"backend.sim_time_scale": 1.0})))
    out = tmp_path / "live.json"
    code = main(
        ["tune", "--profile", str(PROFILES / "a800-mistral7b-int8-reference.yaml"), "--rate", "4",
         "--duration", "8", "--seeds", "1", "--output-tokens", "choice:2,4", "--slo-p99-s", "5",
         "--windows-ms", "100,250", "--sizes", "4,16", "--live", url, "--quiet", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report: dict[str, Any] = json.loads(out.read_text())
    best, live = report["recommended"], report["live"]
    get = urllib.request.Request(f"{url}/ecobatch/batching", headers={"Authorization": "Bearer sk-admin"})
    with urllib.request.urlopen(get, timeout=5) as r:
        applied = json.load(r)["settings"]
    assert applied["max_batch_sequences"] == best["settings"]["max_batch_sequences"]
    assert applied["window_max_ms"] == best["settings"]["window_max_ms"]
    assert applied["slo_ms"] == 5000.0, "the server keeps the SLO the setting was chosen under"
    measured = live["measured"]
    assert measured["ok"] == measured["requests"] > 10
    p50 = live["comparison"]["p50_s"]
    assert p50["model_error"] == pytest.approx(0.0, abs=0.25), p50  # -2.5 % when this was written
    assert live["comparison"]["joules_per_request"]["measured"] > 0  # the proxy's own (modelled) joules


def test_tune_live_refuses_a_wrong_admin_key_and_a_profile_of_the_other_engine_shape_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ECOBATCH_ADMIN_KEYS", "sk-admin")
    url = serve_in_thread(create_app(load_settings(None, {"backend.sim_time_scale": 1.0})))  # real time
    common = ["--duration", "5", "--seeds", "1", "--output-tokens", "2", "--slo-p99-s", "60",
              "--windows-ms", "100", "--sizes", "4", "--budgets-ms", "100", "--live", url]  # fmt: skip
    static = str(PROFILES / "a800-mistral7b-int8-reference.yaml")
    assert main(["tune", "--profile", static, *common, "--admin-key", "wrong"]) == 2
    err = capsys.readouterr().err
    assert "answered 401" in err and "admin key" in err and "Traceback" not in err
    continuous = str(PROFILES / "h200-vllm-mistral7b-bf16-reference.yaml")
    assert main(["tune", "--profile", continuous, *common, "--admin-key", "sk-admin"]) == 2
    err = capsys.readouterr().err
    assert "runs a static engine" in err and "is continuous" in err
    fast = serve_in_thread(create_app(load_settings(None, {"backend.sim_time_scale": 0.05})))
    common[-1] = fast
    assert main(["tune", "--profile", static, *common, "--admin-key", "sk-admin"]) == 2
    err = capsys.readouterr().err
    assert "runs at --sim-time-scale 0.05, not in real time" in err, err


def test_bench_against_nothing_listening_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "--url", url, "--requests", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ecobatch bench: --url {url}: cannot reach it") and "Traceback" not in err


def test_tune_stops_its_sizes_at_the_profiles_largest_point(capsys: pytest.CaptureFixture[str]) -> None:
    static = str(PROFILES / "a800-mistral7b-int8-reference.yaml")  # batch sizes up to 64
    assert main(["tune", "--profile", static, "--rate", "1", "--duration", "20", "--seeds", "1",
                 "--slo-p99-s", "600", "--windows-ms", "100"]) == 0  # fmt: skip
    sizes = {
        int(line.split("batch ")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("window 100 ms, batch ")
    }
    assert sizes == {4, 8, 16, 32, 64}


def test_plan_writes_a_modelled_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    code = main(["plan", "--rate", "20", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "modelled" in printed.lower()
    assert json.loads(out.read_text())


@pytest.mark.parametrize(
    ("value", "says"),
    [("{bad json", "not JSON (Expecting property name"), ("[1]", "must be a JSON object")],
)
def test_engine_args_that_are_not_a_json_object_are_refused_saying_why(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--engine-args", value])
    assert exited.value.code == 2
    assert f"argument --engine-args: {says}" in capsys.readouterr().err


def test_the_old_max_batch_size_flag_is_refused_naming_the_three_that_replace_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--max-batch-size", "8"]) == 2
    err = capsys.readouterr().err
    for flag in ("--max-batch-sequences", "--max-inflight-sequences", "--max-prompts-per-request"):
        assert flag in err, err


def test_a_multiple_of_a_baseline_that_cannot_keep_up_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """One request at a time on the A800 seed profile cannot serve 4 req/s of 256-token answers: its p99
    grows with the run, so "1.5 x the baseline" would be an SLO of hours."""
    static = str(PROFILES / "a800-mistral7b-int8-reference.yaml")
    code = main(
        ["tune", "--profile", static, "--rate", "4", "--duration", "60", "--seeds", "1",
         "--output-tokens", "256", "--slo-p99-x-baseline", "1.5", "--windows-ms", "100", "--sizes", "4"]
    )  # fmt: skip
    assert code == 2
    assert "the baseline cannot keep up with this load" in capsys.readouterr().err

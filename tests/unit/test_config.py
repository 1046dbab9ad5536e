from __future__ import annotations

from pathlib import Path

import pytest

from ecobatch.config import BACKEND_SHAPES, DEFAULT_PROFILES, load_settings
from ecobatch.errors import ConfigError
from ecobatch.profile import load_profile


def test_defaults_are_the_simulated_backend_on_the_reference_profile() -> None:
    s = load_settings()
    assert s.backend.kind == "simulated"
    assert (s.batching.window_min_ms, s.batching.window_max_ms) == (50.0, 100.0)
    assert s.energy.profile_path("static") == DEFAULT_PROFILES["static"]
    assert all(path.is_file() for path in DEFAULT_PROFILES.values())


def test_yaml_is_read_and_flags_override_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batching:\n  window_max_ms: 80\n  max_batch_sequences: 16\nserver:\n  port: 9000\n")
    s = load_settings(cfg, {"batching.max_batch_sequences": 8, "server.port": None})
    assert s.batching.window_max_ms == 80.0
    assert s.batching.max_batch_sequences == 8
    assert s.server.port == 9000


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "batching:\n  window_max_ms: 10\n",
            r"batching.window_max_ms=10.0 must be >= batching.window_min_ms",
        ),
        ("batching:\n  max_batch_sequences: 0\n", r"batching.max_batch_sequences=0 must be >= 1"),
        ("batching:\n  max_batch_sequences: 2.5\n", r"batching.max_batch_sequences=2.5 must be an integer"),
        (
            "batching:\n  max_batch_size: 8\n",
            r"batching.max_batch_size is no longer a setting: use batching.max_batch_sequences .*"
            r"batching.max_inflight_sequences .* or server.max_prompts_per_request",
        ),
        (
            "batching:\n  flex_budget_ms: 50\n",
            r"batching.flex_budget_ms=50.0 must be >= batching.interactive",
        ),
        (
            "batching:\n  flex_budget_ms: .inf\n",
            r"batching.flex_budget_ms=inf must be <= 3600000(\.0)? \(an hour",
        ),
        (
            "batching:\n  interactive_budget_ms: .nan\n",
            r"batching.interactive_budget_ms=nan must be >= 0",
        ),
        ("batching:\n  tpot_slo_ms: 0\n", r"batching.tpot_slo_ms=0 must be > 0"),
        ("server:\n  max_prompts_per_request: 0\n", r"server.max_prompts_per_request=0 must be >= 1"),
        ("batching:\n  windw_ms: 3\n", r"batching.windw_ms is not a setting"),
        ("backend:\n  kind: triton\n", r"backend.kind='triton' must be one of"),
        ("backend:\n  kind: vllm-async\n", r"backend.model=None must be a model path"),
        ("backend:\n  upstream: localhost:8000\n", r"backend.upstream='localhost:8000' must be an http"),
        ("energy:\n  price_per_kwh: -1\n", r"energy.price_per_kwh=-1 must be >= 0"),
        ("gpu: {}\n", r"gpu is not a config section"),
        ("energy:\n  meter: dcgm\n", r"energy.dcgm_url=None must be set when energy.meter is 'dcgm'"),
        ("energy:\n  meter: zeus\n", r"energy.meter='zeus' must be one of"),
        ("backend:\n  context_length: 1\n", r"backend.context_length=1 must be >= 2"),
        ("backend:\n  replicas_refresh_s: 0\n", r"backend.replicas_refresh_s=0 must be > 0"),
        ("server:\n  port: '80'\n", r"server.port='80' must be an integer"),
        ("server:\n  port: 70000\n", r"server.port=70000 must be <= 65535"),
        (
            "backend:\n  routing: random\n",
            r"backend.routing='random' must be one of \['pack', 'round-robin'\]",
        ),
        ("energy:\n  gpu_indices: [0, a]\n", r"energy.gpu_indices\[1\]='a' must be an integer"),
        ("backend:\n  engine_args: 5\n", r"backend.engine_args=5 must be a mapping"),
        (
            "backend:\n  kind: vllm-http\n  replicas: [{url: 'http://a:1'}, {url: 'ftp://b'}]\n",
            r"backend.replicas\[1\].url='ftp://b' must be an http:// or https:// URL",
        ),
        (
            "backend:\n  kind: vllm-http\n  replicas: [{url: 'http://a:1', colour: red}]\n",
            r"backend.replicas\[0\].colour is not a setting; known: \[.*'url'\]",
        ),
        ("- 1\n", r"top level must be a mapping"),
        (
            "backend:\n  replicas: [{url: 'http://a:1'}]\n",
            r"backend.replicas=\['http://a:1'\] must be empty unless backend.kind is 'vllm-http'",
        ),
        (
            "backend:\n  kind: vllm-http\n  upstream: http://x:1\n  replicas: [{url: 'http://a:1'}]\n",
            r"backend.upstream='http://x:1' must be unset when backend.replicas",
        ),
        (
            "backend:\n  kind: vllm-http\n  replicas: [{url: 'http://a:1'}, {url: 'http://A:1/'}]\n",
            r"backend.replicas\[\].url=.* must be unique",
        ),
        (
            "backend:\n  kind: vllm-http\n  replicas: [{url: 'http://a:1', dcgm_labels: {gpu: 0}}]\n",
            r"backend.replicas\[0\].dcgm_labels=\{'gpu': '0'\} must be used with a dcgm-exporter URL",
        ),
        (
            "backend:\n  kind: vllm-http\n  replicas: [{url: 'http://a:1', dcgm_url: 'http://d:9400'}]\n"
            "energy:\n  meter: nvml\n",
            r"backend.replicas\[0\].dcgm_labels=.* must be unset while energy.meter is 'nvml'",
        ),
    ],
)
def test_bad_values_name_the_field_and_the_limit(tmp_path: Path, yaml_text: str, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"batching.max_queue": "many"}, "batching.max_queue"),  # a wrong type
        ({"backend.replicas_refresh_s": -1}, "backend.replicas_refresh_s"),  # out of range
        ({"energy.meter": "zeus"}, "energy.meter"),  # not one of the choices
        ({"backend.kind": "vllm-http", "backend.replicas": [{"url": "x"}]}, "backend.replicas[0].url"),
    ],
)
def test_a_config_error_carries_the_full_dotted_key(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, overrides)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_the_configuration_page_documents_every_setting_at_its_default() -> None:
    """docs/configuration.md's table (a row may name several keys of a section: ``server.host / port``)
    against the schema."""
    import re

    import msgspec
    import yaml

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    documented: dict[str, object] = {}
    row = re.compile(r"^\| ((?:server|backend|batching|energy)\.[a-z_ /]+) \| ([^|]+) \|", re.M)
    for keys, defaults in row.findall(page):
        section, _, rest = keys.partition(".")
        names, values = rest.strip().split(" / "), defaults.strip().split(" / ")
        for name, value in zip(names, values, strict=True):
            mib = re.fullmatch(r"(\d+) MiB", value)
            documented[f"{section}.{name}"] = int(mib[1]) * 1024 * 1024 if mib else yaml.safe_load(value)
    settings = load_settings()
    schema = {
        f"{section}.{key}": value
        for section in ("server", "backend", "batching", "energy")
        for key, value in msgspec.structs.asdict(getattr(settings, section)).items()
    }
    assert set(documented) == set(schema), set(documented) ^ set(schema)
    for key, value in schema.items():
        assert documented[key] == value, f"{key}: documented {documented[key]!r}, default {value!r}"


def test_every_shape_only_setting_is_a_batching_setting() -> None:
    from ecobatch.config import SHAPE_ONLY_SETTINGS, BatchingSettings

    assert set(SHAPE_ONLY_SETTINGS) <= set(BatchingSettings.__struct_fields__)
    assert set(SHAPE_ONLY_SETTINGS.values()) == set(BACKEND_SHAPES.values())


def test_replicas_selecting_the_same_dcgm_series_are_refused_before_start_up() -> None:
    replicas = [{"url": "http://a:1"}, {"url": "http://b:1"}]
    with pytest.raises(ConfigError, match=r"backend.replicas\[0\] and backend.replicas\[1\] select the same"):
        load_settings(
            None,
            {"backend.kind": "vllm-http", "backend.replicas": replicas, "energy.dcgm_url": "http://d:9400"},
        )
    apart = [
        {"url": "http://a:1", "dcgm_labels": {"gpu": "0"}},
        {"url": "http://b:1", "dcgm_labels": {"gpu": "1"}},
    ]
    load_settings(
        None, {"backend.kind": "vllm-http", "backend.replicas": apart, "energy.dcgm_url": "http://d:9400"}
    )
    load_settings(None, {"backend.kind": "vllm-http", "backend.replicas": replicas})  # no exporter: modelled


def test_meter_dcgm_takes_each_replicas_own_exporter() -> None:
    replicas = [
        {"url": "http://a:1", "dcgm_url": "http://a:9400"},
        {"url": "http://b:1", "dcgm_url": "http://b:9400"},
    ]
    settings = load_settings(
        None, {"backend.kind": "vllm-http", "backend.replicas": replicas, "energy.meter": "dcgm"}
    )
    assert [r.dcgm_url for r in settings.backend.replicas] == ["http://a:9400", "http://b:9400"]


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/*.yaml should hold at least the default server config"
    for f in files:
        settings = load_settings(f)
        shape = BACKEND_SHAPES[settings.backend.kind]
        assert load_profile(settings.energy.profile_path(shape)).kind == shape, (
            f"{f}: profile of the wrong kind"
        )


def test_paths_in_a_config_file_are_relative_to_that_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "c.yaml"
    cfg.write_text("energy:\n  profile: profiles/mine.yaml\n")
    assert load_settings(cfg).energy.profile == str(tmp_path / "conf" / "profiles" / "mine.yaml")
    assert load_settings(cfg, {"energy.profile": "flag.yaml"}).energy.profile == "flag.yaml"


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config .*nope.yaml: cannot be read"):
        load_settings(tmp_path / "nope.yaml")


def test_an_in_process_engine_without_its_packages_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from ecobatch.config import DEFAULT_PROFILES
    from ecobatch.engines import create_static_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    settings = load_settings(None, {"backend.kind": "hf-bnb", "backend.model": "/m"})
    with pytest.raises(ConfigError, match=r"needs torch, not installed here: pip install 'ecobatch\[hf\]'"):
        create_static_engine(settings, load_profile(DEFAULT_PROFILES["static"]))


def test_the_documented_config_lists_every_setting_at_its_default() -> None:
    import msgspec
    import yaml

    root = Path(__file__).resolve().parents[2]
    documented = yaml.safe_load((root / "configs" / "ecobatch.yaml").read_text())
    defaults = load_settings()
    for section in ("server", "backend", "batching", "energy"):
        expected = msgspec.structs.asdict(getattr(defaults, section))
        assert set(documented[section]) == set(expected), section
    assert load_settings(root / "configs" / "ecobatch.yaml") == defaults


def test_replicas_from_dns_are_declared_in_one_section() -> None:
    s = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.replicas_dns": {"name": "vllm-headless.llm.svc.cluster.local", "port": 8001},
        },
    )
    dns = s.backend.replicas_dns
    assert dns is not None
    assert (dns.name, dns.port, dns.scheme, dns.family, dns.dcgm_pod_label) == (
        "vllm-headless.llm.svc.cluster.local",
        8001,
        "http",
        "ipv4",
        None,
    )
    assert s.backend.replicas == []  # none known before the name is looked up


VLLM = "backend:\n  kind: vllm-http\n"
DNS = VLLM + "  replicas_dns: {name: vllm-headless, "


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (DNS + "port: 0}\n", r"backend.replicas_dns.port=0 must be >= 1"),
        (DNS + "port: '8000'}\n", r"backend.replicas_dns.port='8000' must be an integer"),
        (DNS + "scheme: grpc}\n", r"backend.replicas_dns.scheme='grpc' must be one of \['http', 'https'\]"),
        (DNS + "family: any}\n", r"backend.replicas_dns.family='any' must be one of \['ipv4', 'ipv6'\]"),
        (
            DNS + "ttl: 5}\n",
            r"backend.replicas_dns.ttl is not a setting; known: \['dcgm_pod_label', 'family'",
        ),
        (
            VLLM + "  replicas_dns: {name: 'http://vllm-headless:8000'}\n",
            r"backend.replicas_dns.name='http://vllm-headless:8000' must be a DNS name without scheme, port",
        ),
        (VLLM + "  replicas_dns: {port: 8000}\n", r"backend.replicas_dns.name is required"),
        (VLLM + "  replicas_dns: vllm-headless\n", r"backend.replicas_dns='vllm-headless' must be a mapping"),
        (
            "backend:\n  replicas_dns: {name: vllm-headless}\n",
            r"backend.replicas_dns='vllm-headless' must be unset unless backend.kind is 'vllm-http'",
        ),
        (
            DNS + "port: 8000}\n  replicas: [{url: 'http://a:8000'}]\n",
            r"backend.replicas=\['http://a:8000'\] must be empty when backend.replicas_dns finds the",
        ),
        (
            DNS + "port: 8000}\n  upstream: 'http://a:8000'\n",
            r"backend.upstream='http://a:8000' must be unset when backend.replicas_dns finds the upstreams",
        ),
        (
            DNS + "port: 8000}\nenergy:\n  meter: nvml\n",
            r"energy.meter='nvml' must be 'dcgm', 'model' or 'auto' with backend.replicas_dns",
        ),
        (
            DNS + "port: 8000}\nenergy:\n  dcgm_url: 'http://dcgm:9400/metrics'\n",
            r"backend.replicas_dns.dcgm_pod_label=None must be set \(e.g. pod\) when energy is read from",
        ),
        (
            DNS + "dcgm_pod_label: pod}\n",
            r"backend.replicas_dns.dcgm_pod_label='pod' must be null unless energy is read from dcgm",
        ),
        (
            DNS + "dcgm_pod_label: pod}\nenergy:\n  meter: model\n  dcgm_url: 'http://dcgm:9400/metrics'\n",
            r"backend.replicas_dns.dcgm_pod_label='pod' must be null unless energy is read from dcgm",
        ),
    ],
)
def test_replicas_from_dns_refuse_what_cannot_work_naming_the_field_and_the_limit(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_replicas_come_from_a_file_or_from_dns_not_both(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DNS + "port: 8000}\n  replicas_file: missing.yaml\n")
    with pytest.raises(
        ConfigError,
        match=r"backend.replicas_file and backend.replicas_dns are both set: the replicas come from one",
    ):
        load_settings(cfg)  # said before the file is read (it does not exist)


def test_replicas_from_dns_with_dcgm_exporter_select_each_pods_gpu() -> None:
    s = load_settings(
        None,
        {
            "backend.kind": "vllm-http",
            "backend.replicas_dns": {"name": "vllm-headless", "dcgm_pod_label": "pod"},
            "energy.dcgm_url": "http://dcgm:9400/metrics",
        },
    )
    assert s.backend.replicas_dns is not None and s.backend.replicas_dns.dcgm_pod_label == "pod"

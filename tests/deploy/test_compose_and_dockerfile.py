"""deploy/compose and the Dockerfile, checked without Docker, a GPU or a network.

compose.yaml is validated against ``deploy/compose/compose-subset.schema.json``: a schema written for this
repository (not the Compose Specification's own, which is not vendored here) that types every attribute
compose.yaml uses and refuses attributes the specification does not define. Beyond the schema: every
file it mounts exists, ecobatch's configs load with ecobatch's own loader and name services of their own
stack, vLLM runs the INT8 recipe's flags, and Prometheus and Grafana (deploy/prometheus, deploy/grafana)
find what they are told to find where compose.yaml puts it.

The Dockerfile is read line by line (continuations joined, comments dropped): what it copies is in the
build context (.dockerignore), it runs as a non-root user, its command is ``ecobatch serve`` with flags
the CLI accepts and a config the image ships, and that command, run here, answers the image's
HEALTHCHECK on /health.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import json
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from ecobatch.cli import _serve_parser, settings_from_args
from ecobatch.config import BACKEND_SHAPES, Settings, load_settings
from ecobatch.energy.dcgm import DCGM_ENERGY_METRIC, DCGM_POWER_LIMIT_METRIC, DCGM_POWER_METRIC
from ecobatch.profile import load_profile
from ecobatch.serving.server import EXIT_AFTER_GRACE_S
from ecobatch.testing.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
SCHEMA_FILE = COMPOSE_DIR / "compose-subset.schema.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INT8_RECIPE = ROOT / "configs" / "vllm" / "mistral7b-int8.sh"
CONFIG_IN_IMAGE = "/etc/ecobatch/ecobatch.yaml"

GPU_STACK = {"vllm", "ecobatch", "dcgm-exporter", "prometheus", "grafana"}
CPU_STACK = {"ecobatch-sim", "prometheus-cpu", "grafana", "loadgen"}
# (profile, service): what Prometheus must scrape in each stack, as `host:port`
MUST_SCRAPE = {
    ("gpu", "prometheus"): {"ecobatch:8080", "vllm:8000", "dcgm-exporter:9400"},
    ("cpu", "prometheus-cpu"): {"ecobatch-sim:8080"},
}
ECOBATCH_SERVICES = {"ecobatch": "ecobatch.yaml", "ecobatch-sim": "ecobatch-sim.yaml"}
# Files compose.yaml must hand its containers (deploy/prometheus and deploy/grafana are another part of
# the deploy work: this asserts that they are there and that compose mounts them).
MOUNTED = [
    ROOT / "deploy" / path
    for path in (
        "compose/ecobatch.yaml",
        "compose/ecobatch-sim.yaml",
        "compose/dcgm-counters.csv",
        "compose/make_int8_checkpoint.py",
        "prometheus/prometheus.yml",
        "prometheus/prometheus-cpu.yml",
        "prometheus/rules/ecobatch.rules.yml",
        "grafana/provisioning/datasources/prometheus.yaml",
        "grafana/provisioning/dashboards/ecobatch.yaml",
        "grafana/dashboards/ecobatch.json",
    )
]

Obj = dict[str, Any]


# ---- compose.yaml -------------------------------------------------------------------------------------


@cache
def compose() -> Obj:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


_VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with no variable set: the default ('' without one); $$ is a $."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return match.group("default") or ""

    return _VARIABLE.sub(sub, value)


def services() -> dict[str, Obj]:
    return dict(compose()["services"])


def in_profile(profile: str) -> dict[str, Obj]:
    return {name: svc for name, svc in services().items() if profile in svc.get("profiles", [])}


def names_in(profile: str) -> dict[str, str]:
    """Every name a container of the profile answers to (its service name and its network aliases)."""
    names: dict[str, str] = {}
    for name, svc in in_profile(profile).items():
        names[name] = name
        networks = svc.get("networks", {})
        if isinstance(networks, dict):
            for settings in networks.values():
                for alias in (settings or {}).get("aliases", []):
                    names[alias] = name
    return names


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/", "~"))

    @property
    def host_path(self) -> Path:
        return (COMPOSE_DIR / self.source).resolve()


def mounts(svc: Obj) -> list[Mount]:
    found = []
    for entry in svc.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = interpolate(entry).split(":")
            found.append(Mount(source, target, "ro" in ",".join(mode).split(",")))
        else:
            found.append(Mount(entry.get("source", ""), entry["target"], bool(entry.get("read_only"))))
    return found


def published(svc: Obj) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) per published port (short syntax)."""
    ports = []
    for entry in svc.get("ports", []):
        address, host_port, container_port = interpolate(str(entry)).rsplit(":", 2)
        ports.append((address, int(host_port), int(container_port)))
    return ports


def container_ports(svc: Obj) -> set[int]:
    return {port for _, _, port in published(svc)}


def command(svc: Obj) -> list[str]:
    cmd = svc.get("command", [])
    return [interpolate(part) for part in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} must be given once in {args}"
    return args[args.index(name) + 1]


def gpu_reservations(svc: Obj) -> list[Obj]:
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def in_container(svc: Obj, path: str) -> Path | None:
    """The repository file that `path` is inside the service's container: a bind mount, else a file
    the Dockerfile's last stage copies in (for services built from it); None if neither holds it."""
    candidates = [(m.target, m.host_path) for m in mounts(svc) if m.is_bind]
    if "build" in svc:
        candidates += [(dest, ROOT / src) for src, dest in final_copies()]
    for target, host in sorted(candidates, key=lambda c: -len(c[0])):  # the deepest mount wins
        target = target.rstrip("/")
        if path == target:
            return host
        if path.startswith(target + "/"):
            return host / path[len(target) + 1 :]
    return None


def container_config(service: str) -> Settings:
    svc = services()[service]
    config = in_container(svc, CONFIG_IN_IMAGE)
    assert config is not None, f"{service}: nothing provides {CONFIG_IN_IMAGE}"
    return load_settings(config)


@cache
def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(document: Obj) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in schema_validator().iter_errors(document)
    ]


# ---- the Dockerfile and .dockerignore ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to; -1 before the first


@cache
def dockerfile() -> tuple[Instruction, ...]:
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments end nothing, also inside a continuation
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continuation"
    return tuple(instructions)


def stages() -> list[tuple[str, str | None]]:
    """(base image with global ARG defaults substituted, stage name) per FROM."""
    global_args = dict(
        arg.args.split("=", 1) for arg in dockerfile() if arg.keyword == "ARG" and arg.stage == -1
    )
    found = []
    for ins in dockerfile():
        if ins.keyword == "FROM":
            parts = ins.args.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            found.append((image, name))
    return found


def final_stage() -> list[Instruction]:
    last = len(stages()) - 1
    return [ins for ins in dockerfile() if ins.stage == last]


def copy_args(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """A COPY's flags, sources and destination."""
    words = shlex.split(ins.args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    if paths and paths[0].startswith("["):
        paths = json.loads(" ".join(paths))
    return flags, paths[:-1], paths[-1]


def copies(stage: int | None = None) -> list[tuple[str, str]]:
    """(source, destination) of the COPYs from the build context (not --from another stage)."""
    found = []
    for ins in dockerfile():
        if ins.keyword == "COPY" and (stage is None or ins.stage == stage):
            flags, sources, dest = copy_args(ins)
            if "from" not in flags:
                found += [(src, dest) for src in sources]
    return found


def final_copies() -> list[tuple[str, str]]:
    return copies(len(stages()) - 1)


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def env(instructions: list[Instruction]) -> dict[str, str]:
    found: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                name, _, value = word.partition("=")
                found[name] = value
    return found


def last(keyword: str) -> Instruction:
    matching = [ins for ins in final_stage() if ins.keyword == keyword]
    assert matching, f"the final stage has no {keyword}"
    return matching[-1]


def healthcheck() -> tuple[dict[str, str], list[str]]:
    options, _, cmd = last("HEALTHCHECK").args.partition("CMD")
    flags = dict(w[2:].partition("=")[::2] for w in options.split())
    return flags, exec_form(cmd.strip())


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regular expression: Go's filepath.Match (``*``, ``?``, ``[...]``, none
    crossing a ``/``) plus Docker's ``**`` (any number of directories)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):  # "**/" also matches no directory at all
                out = out[:-2] + "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:  # a character class, [^...] negated
            end = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1 : end].replace("\\", "\\\\") + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@cache
def ignore_rules() -> tuple[tuple[bool, re.Pattern[str]], ...]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _ignore_regex(pattern)))
    return tuple(rules)


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build context: the last
    rule matching the path or one of its parent directories decides, as Docker's does."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, regex in ignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            verdict = not negated
    return verdict


def _build_output(rel: Path) -> bool:
    """What a local install leaves in the source tree (byte code, setuptools' egg-info)."""
    return rel.suffix == ".pyc" or any(p == "__pycache__" or p.endswith(".egg-info") for p in rel.parts)


def context_files(source: str) -> Iterator[str]:
    """The repository's files that COPY `source` copies, less local build outputs."""
    path = ROOT / source
    if path.is_file():
        yield source.rstrip("/")
        return
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(ROOT)
        if file.is_file() and not _build_output(rel):
            yield rel.as_posix()


@cache
def pyproject() -> Obj:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extras_named(value: str) -> list[str]:
    return [e.strip() for e in value.split(",") if e.strip()]


def serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ecobatch")
    _serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def image_cmd() -> list[str]:
    return exec_form(last("CMD").args)


# ---- compose.yaml: the schema ------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_schema() -> None:
    assert schema_errors(compose()) == []


def _typo(doc: Obj) -> None:
    doc["services"]["vllm"]["volume"] = doc["services"]["vllm"].pop("volumes")


def _gpu_without_capabilities(doc: Obj) -> None:
    del doc["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]


def _unknown_condition(doc: Obj) -> None:
    doc["services"]["ecobatch"]["depends_on"]["vllm"]["condition"] = "healthy"


def _count_and_device_ids(doc: Obj) -> None:
    doc["services"]["dcgm-exporter"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = 1


def _interval_without_unit(doc: Obj) -> None:
    doc["services"]["vllm"]["healthcheck"]["interval"] = 10


@pytest.mark.parametrize(
    "mistake",
    [_typo, _gpu_without_capabilities, _unknown_condition, _count_and_device_ids, _interval_without_unit],
    ids=lambda f: f.__name__.strip("_"),
)
def test_the_schema_refuses_mistakes_compose_would_refuse(mistake: Any) -> None:
    broken = copy.deepcopy(compose())
    mistake(broken)
    assert schema_errors(broken), f"{mistake.__name__} passed the schema"


# ---- compose.yaml: the two stacks ----------------------------------------------------------------------


def test_profiles_split_the_gpu_stack_from_the_cpu_stack() -> None:
    assert set(in_profile("gpu")) == GPU_STACK
    assert set(in_profile("cpu")) == CPU_STACK
    without = [name for name, svc in services().items() if not svc.get("profiles")]
    assert without == [], "a service without a profile would start with every stack"


def test_only_the_gpu_services_hold_a_gpu_and_all_hold_the_same_one() -> None:
    holders = {name for name, svc in services().items() if gpu_reservations(svc)}
    assert holders == {"vllm", "dcgm-exporter", "int8-checkpoint"}
    assert not holders & set(in_profile("cpu"))
    reservations = [gpu_reservations(services()[name]) for name in sorted(holders)]
    assert all(r == reservations[0] for r in reservations), "they must reserve the same GPU"
    (device,) = reservations[0]
    assert device["driver"] == "nvidia"
    assert [interpolate(i) for i in device["device_ids"]] == ["0"]


def test_vllm_serves_the_int8_checkpoint_with_the_recipes_flags() -> None:
    vllm = services()["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    args = command(vllm)
    assert args[1:] == [
        "--served-model-name", "mistral-7b-int8",
        "--quantization", "bitsandbytes",
        "--max-model-len", "4096",
        "--max-num-seqs", "64",
        "--gpu-memory-utilization", "0.90",
        "--port", "8000",
    ]  # fmt: skip
    # the same flags as the recipe the README gives (configs/vllm/mistral7b-int8.sh)
    recipe = re.findall(r"^\s+(--[\w-]+) (\S+) \\$", INT8_RECIPE.read_text(), flags=re.MULTILINE)
    assert [word for pair in recipe for word in pair] == args[1:]
    # the checkpoint is on a volume, and int8-checkpoint writes it there
    model_dir = args[0]
    (models,) = [m for m in mounts(vllm) if model_dir.startswith(m.target + "/")]
    assert not models.is_bind and models.source in compose()["volumes"]
    writer = services()["int8-checkpoint"]
    assert command(writer)[-1] == model_dir
    assert models.source in {m.source for m in mounts(writer) if not m.read_only}
    assert writer["image"] == vllm["image"]
    assert vllm["healthcheck"]["test"][-1].endswith(
        "urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
    )


def test_every_file_compose_mounts_exists_in_the_repository() -> None:
    binds = [(name, m) for name, svc in services().items() for m in mounts(svc) if m.is_bind]
    provided = {m.host_path for _, m in binds}
    for path in MOUNTED:
        assert any(path == p or path.is_relative_to(p) for p in provided), f"{path}: not mounted"
    missing = [f"{name}: {m.source}" for name, m in binds if not m.host_path.exists()]
    assert missing == []
    for name, m in binds:
        assert m.read_only, f"{name} mounts {m.source} writable"
        assert m.host_path.is_relative_to(ROOT), f"{name} mounts {m.source} from outside the repository"
        # a file where a file is expected: a missing one would be created by Docker as a directory
        looks_like_file = PurePosixPath(m.target).suffix in {".yml", ".yaml", ".json", ".csv", ".py"}
        assert m.host_path.is_file() == looks_like_file, f"{name}: {m.source} -> {m.target}"


def test_named_volumes_are_declared() -> None:
    named = {m.source for svc in services().values() for m in mounts(svc) if not m.is_bind}
    assert named == set(compose()["volumes"])


def test_each_stack_publishes_distinct_ports_on_loopback_only() -> None:
    for profile in ("gpu", "cpu"):
        ports = [p for svc in in_profile(profile).values() for p in published(svc)]
        assert {address for address, _, _ in ports} == {"127.0.0.1"}
        host_ports = [host for _, host, _ in ports]
        assert len(host_ports) == len(set(host_ports)), f"{profile}: a host port is published twice"
    assert {host for _, host, _ in published(services()["ecobatch"])} == {8080}
    assert {host for _, host, _ in published(services()["ecobatch-sim"])} == {8080}
    assert {host for _, host, _ in published(services()["grafana"])} == {3000}


# ---- compose.yaml: ecobatch -----------------------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(ECOBATCH_SERVICES))
def test_ecobatch_configs_load_with_the_product_loader(service: str) -> None:
    svc = services()[service]
    mounted = in_container(svc, CONFIG_IN_IMAGE)
    assert mounted == COMPOSE_DIR / ECOBATCH_SERVICES[service]
    settings = container_config(service)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.metrics_port is None, "Prometheus scrapes /metrics on the main port"
    assert container_ports(svc) == {settings.server.port}
    # the energy profile it names is in the container, and fits its engine
    shape = BACKEND_SHAPES[settings.backend.kind]
    if settings.energy.profile is not None:
        profile_file = in_container(svc, settings.energy.profile)
        assert profile_file is not None and profile_file.is_file(), settings.energy.profile
        assert load_profile(profile_file).kind == shape


def test_gpu_ecobatch_fronts_vllm_and_reads_the_gpus_energy_from_dcgm_exporter() -> None:
    settings = container_config("ecobatch")
    vllm_args = command(services()["vllm"])
    upstream = urlsplit(settings.backend.upstream)
    assert (upstream.hostname, upstream.port) == ("vllm", int(flag(vllm_args, "--port")))
    assert settings.backend.kind == "vllm-http"
    assert settings.backend.model == flag(vllm_args, "--served-model-name")
    assert settings.batching.max_inflight_sequences == int(flag(vllm_args, "--max-num-seqs"))
    assert settings.energy.meter == "dcgm"
    assert settings.energy.dcgm_url is not None
    dcgm = urlsplit(settings.energy.dcgm_url)
    exporter = services()["dcgm-exporter"]
    assert dcgm.hostname == "dcgm-exporter" and dcgm.port in container_ports(exporter)
    assert dcgm.path == "/metrics"
    assert exporter["image"].startswith("nvcr.io/nvidia/k8s/dcgm-exporter:")
    # dcgm-exporter collects every second and exports what ecobatch's dcgm meter reads
    args = command(exporter)
    assert int(flag(args, "-c")) <= 1000
    counters = in_container(exporter, flag(args, "-f"))
    assert counters is not None
    fields = {
        line.split(",")[0].strip()
        for line in counters.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {DCGM_ENERGY_METRIC, DCGM_POWER_METRIC, DCGM_POWER_LIMIT_METRIC} <= fields
    assert services()["ecobatch"]["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_cpu_ecobatch_runs_the_simulated_backend_and_says_its_energy_is_modelled() -> None:
    settings = container_config("ecobatch-sim")
    assert settings.backend.kind == "simulated"
    assert settings.energy.meter == "model"
    loadgen = command(services()["loadgen"])
    assert loadgen[:2] == ["ecobatch", "bench"]
    target = urlsplit(flag(loadgen, "--url"))
    assert (target.hostname, target.port) == ("ecobatch-sim", settings.server.port)
    assert flag(loadgen, "--out").startswith("/tmp/"), "the image's user can write only there"


@pytest.mark.parametrize("service", sorted(ECOBATCH_SERVICES))
def test_ecobatch_services_build_the_repositorys_dockerfile_and_wait_out_the_drain(service: str) -> None:
    svc = services()[service]
    build = svc["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    assert set(extras_named(build["args"]["EXTRAS"])) <= set(pyproject()["project"]["optional-dependencies"])
    grace = container_config(service).server.shutdown_grace_s
    stop = svc["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) >= grace + EXIT_AFTER_GRACE_S, "it waits out the drain"


# ---- compose.yaml: Prometheus and Grafana ----------------------------------------------------------------


def prometheus_config(service: str) -> Obj:
    path = in_container(services()[service], "/etc/prometheus/prometheus.yml")
    assert path is not None, f"{service}: no prometheus.yml mounted"
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize(("profile", "service"), sorted(MUST_SCRAPE))
def test_prometheus_scrapes_the_services_of_its_own_stack(profile: str, service: str) -> None:
    targets = {
        target
        for job in prometheus_config(service)["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert MUST_SCRAPE[(profile, service)] <= targets
    names = names_in(profile)
    for target in targets:
        host, _, port = target.rpartition(":")
        assert host in names, f"{service} scrapes {target}: no service {host} in profile {profile}"
        assert int(port) in container_ports(services()[names[host]]), f"{target}: not a port it serves"


@pytest.mark.parametrize("service", ["prometheus", "prometheus-cpu"])
def test_prometheus_loads_the_mounted_rule_file(service: str) -> None:
    svc = services()[service]
    loaded: set[Path] = set()
    for pattern in prometheus_config(service)["rule_files"]:
        pattern = posixpath.join("/etc/prometheus", pattern)  # relative to the config file
        directory = in_container(svc, posixpath.dirname(pattern))
        assert directory is not None and directory.is_dir(), f"{pattern}: its directory is not mounted"
        loaded |= {f for f in directory.iterdir() if fnmatch.fnmatch(f.name, posixpath.basename(pattern))}
    rules = ROOT / "deploy" / "prometheus" / "rules" / "ecobatch.rules.yml"
    assert rules in loaded
    for rule_file in loaded:  # each is a rule file, not a promtool test file
        assert "groups" in yaml.safe_load(rule_file.read_text()), rule_file


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_grafanas_datasource_reaches_prometheus_in_either_stack(profile: str) -> None:
    grafana = services()["grafana"]
    datasources = in_container(grafana, "/etc/grafana/provisioning/datasources/prometheus.yaml")
    assert datasources is not None
    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    url = urlsplit(source["url"])
    names = names_in(profile)
    assert url.hostname in names, f"{url.hostname} is no service of profile {profile}"
    assert url.port in container_ports(services()[names[url.hostname]])
    assert names[url.hostname].startswith("prometheus")


def test_grafana_provisions_the_dashboard_from_where_compose_mounts_it() -> None:
    grafana = services()["grafana"]
    provider_file = in_container(grafana, "/etc/grafana/provisioning/dashboards/ecobatch.yaml")
    assert provider_file is not None
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    directory = in_container(grafana, provider["options"]["path"])
    assert directory == ROOT / "deploy" / "grafana" / "dashboards"
    dashboard = json.loads((directory / "ecobatch.json").read_text())
    assert dashboard["uid"] == "ecobatch"
    home = in_container(
        grafana, interpolate(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    )
    assert home == directory / "ecobatch.json"


# ---- the INT8 checkpoint script -------------------------------------------------------------------------


def _checkpoint_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_int8_checkpoint", COMPOSE_DIR / "make_int8_checkpoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checkpoint_script_leaves_a_finished_checkpoint_alone_and_refuses_wrong_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _checkpoint_script()
    (tmp_path / "config.json").write_text("{}")
    assert script.main(["mistralai/Mistral-7B-Instruct-v0.3", str(tmp_path)]) == 0
    assert "left as it is" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert script.main([str(tmp_path)]) == 2


# ---- the Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_builds_in_one_python_3_12_slim_stage_and_runs_in_another() -> None:
    assert len(stages()) == 2
    (build_image, build_name), (run_image, _) = stages()
    assert build_image == run_image == "python:3.12-slim"
    assert build_name == "build"
    from_build = [copy_args(i) for i in final_stage() if i.keyword == "COPY" and "--from" in i.args]
    assert from_build == [({"from": "build"}, ["/opt/ecobatch"], "/opt/ecobatch")]
    build_runs = " ".join(i.args for i in dockerfile() if i.keyword == "RUN" and i.stage == 0)
    assert "pip wheel" in build_runs and "python -m venv /opt/ecobatch" in build_runs
    assert env(final_stage())["PATH"].startswith("/opt/ecobatch/bin:")


def test_every_run_is_valid_posix_shell() -> None:
    """RUN's shell form runs /bin/sh (dash in the python image): no bash-only syntax."""
    runs = [i.args for i in dockerfile() if i.keyword == "RUN"]
    assert runs
    for script in runs:
        checked = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=10)
        assert checked.returncode == 0, f"{script}: {checked.stderr}"


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    assert copies()
    for source, _ in copies():
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        files = list(context_files(source))
        assert files, f"COPY {source}: nothing to copy"
        left_out = [f for f in files if ignored(f)]
        assert left_out == [], f"COPY {source}: .dockerignore leaves these out of the context"


def test_the_build_stage_copies_all_that_building_the_wheel_reads() -> None:
    project = pyproject()
    copied = {src.rstrip("/") for src, _ in copies(0)}
    assert "pyproject.toml" in copied
    assert project["project"]["readme"] in copied
    assert set(project["tool"]["setuptools"]["packages"]["find"]["where"]) <= copied


def test_dockerignore_keeps_the_environment_history_and_tests_out_of_the_context() -> None:
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "benchmarks/results/README.md",
        ".whl/x.whl",
    ):
        assert ignored(path), path
    assert ignored("proxy/ecobatch/__pycache__/cli.cpython-312.pyc")
    assert ignored("proxy/ecobatch/stray.pyc") and ignored("proxy/ecobatch.egg-info/PKG-INFO")
    assert not ignored("proxy/ecobatch/cli.py")


def test_extras_are_chosen_at_build_time_from_pyprojects_extras() -> None:
    extras = set(pyproject()["project"]["optional-dependencies"])
    (arg,) = [i for i in dockerfile() if i.keyword == "ARG" and i.stage == 0 and i.args.startswith("EXTRAS")]
    assert arg.args == "EXTRAS=speed"
    install = next(
        i.args for i in dockerfile() if i.keyword == "RUN" and i.stage == 0 and "pip install" in i.args
    )
    assert "${EXTRAS:+[$EXTRAS]}" in install, "an empty EXTRAS must install the base package"
    documented = re.findall(r"--build-arg EXTRAS=(\S*)", DOCKERFILE.read_text())
    assert "vllm" in documented
    for value in documented:
        assert set(extras_named(value)) <= extras, value


def test_the_image_runs_as_a_non_root_user_it_creates() -> None:
    user = last("USER").args
    uid, _, gid = user.partition(":")
    assert uid not in {"0", "root"} and gid not in {"0", "root"}
    assert uid.isdigit() and int(uid) >= 1000, "a numeric uid: Kubernetes' runAsNonRoot can check it"
    creates = " ".join(i.args for i in final_stage() if i.keyword == "RUN")
    assert f"--uid {uid}" in creates and f"--gid {gid}" in creates
    user_index = final_stage().index(last("USER"))
    assert all(i.keyword not in {"RUN"} for i in final_stage()[user_index:]), (
        "nothing runs as root after USER"
    )


def test_cmd_is_ecobatch_serve_with_flags_the_cli_accepts_and_a_config_the_image_ships() -> None:
    cmd = image_cmd()
    assert cmd[:2] == ["ecobatch", "serve"]
    assert "ecobatch" in pyproject()["project"]["scripts"]
    assert not [i for i in final_stage() if i.keyword == "ENTRYPOINT"]
    args = serve_args(cmd[1:])
    assert args.config == CONFIG_IN_IMAGE
    shipped = dict((dest, src) for src, dest in final_copies())[CONFIG_IN_IMAGE]
    args.config = str(ROOT / shipped)
    settings = settings_from_args(args)
    # the default runs anywhere: simulated, modelled energy, reachable from outside the container
    assert settings.backend.kind == "simulated"
    assert settings.energy.meter == "model"
    assert settings.server.host == "0.0.0.0"
    assert [int(p) for p in last("EXPOSE").args.split()] == [settings.server.port]
    # the profiles the image ships are where configs name them
    assert ("configs/profiles/", "/etc/ecobatch/profiles/") in final_copies()


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_a_repository_config_mounted_over_the_images_finds_its_profile_in_the_image(config: str) -> None:
    """`docker run -v .../configs/X.yaml:/etc/ecobatch/ecobatch.yaml`: a relative energy.profile resolves
    beside the mounted file, where the image ships configs/profiles/."""
    raw = yaml.safe_load((ROOT / "configs" / config).read_text())
    profile = (raw.get("energy") or {}).get("profile")
    load_settings(ROOT / "configs" / config)
    if profile is None:
        return
    in_image = posixpath.join(posixpath.dirname(CONFIG_IN_IMAGE), profile)
    shipped = in_container({"build": "."}, in_image)
    assert shipped is not None and shipped.is_file(), f"{config}: {in_image} is not in the image"
    assert shipped == ROOT / "configs" / profile


def test_the_healthcheck_asks_health_with_pythons_urllib_on_the_served_port() -> None:
    flags, cmd = healthcheck()
    assert cmd[:2] == ["python", "-c"] and "urllib.request.urlopen" in cmd[2]
    assert "curl" not in " ".join(cmd) and "wget" not in " ".join(cmd)
    url = urlsplit(env(final_stage())["ECOBATCH_HEALTH_URL"])
    assert (url.hostname, url.path) == ("127.0.0.1", "/health")
    assert [url.port] == [int(p) for p in last("EXPOSE").args.split()]
    assert set(flags) >= {"interval", "timeout", "start-period", "retries"}


def _run_healthcheck(url: str) -> int:
    _, cmd = healthcheck()
    env_vars = {"ECOBATCH_HEALTH_URL": url, "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [sys.executable, *cmd[1:]], env=env_vars, capture_output=True, timeout=10
    ).returncode


def test_the_images_command_answers_its_healthcheck_and_stops_cleanly_on_sigterm() -> None:
    """The CMD as the container runs it (its config mapped to the repository's file; the port moved to
    a free one, as a config may, with ECOBATCH_HEALTH_URL following it)."""
    cmd = image_cmd()
    executable = shutil.which(cmd[0], path=str(Path(sys.executable).parent))
    assert executable is not None, "the ecobatch console script is not installed beside this Python"
    shipped = dict((dest, src) for src, dest in final_copies())[CONFIG_IN_IMAGE]
    argv = [str(ROOT / shipped) if a == CONFIG_IN_IMAGE else a for a in cmd[1:]]
    port = free_port()
    health = f"http://127.0.0.1:{port}/health"
    proc = subprocess.Popen(
        [executable, *argv, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 8
        body: Obj = {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(health, timeout=1) as response:
                    body = json.loads(response.read())
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        assert body.get("status") == "ok", f"not healthy within 8 s: {body}"
        assert (body["backend"], body["energy_source"]) == ("simulated", "model")
        assert _run_healthcheck(health) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "drained" in output
    assert _run_healthcheck(health) != 0, "the check must fail once nothing answers"

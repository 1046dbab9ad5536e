"""deploy/k8s: ecobatch as vLLM's sidecar (base) and as its own Deployment routing over a StatefulSet of
vLLM replicas (overlays/separate), no cluster.

``build`` assembles a kustomization the way kustomize does for the features these manifests use
(resources, and strategic-merge patches that delete an object or merge mappings) and refuses any other
feature, so a manifest that starts to need more of kustomize fails here instead of passing unchecked.
(`kubectl kustomize deploy/k8s/base` and `.../overlays/separate` give the same objects.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ecobatch.config import ReplicaSettings, Settings, load_settings
from ecobatch.serving.replica_sources import ReplicasDns
from ecobatch.serving.server import EXIT_AFTER_GRACE_S

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "ecobatch.rules.yml"
SHAPES = {
    "sidecar": K8S / "base",
    "separate": K8S / "overlays" / "separate",
    "autoscaled": K8S / "overlays" / "autoscaled",  # the sidecar shape with a HorizontalPodAutoscaler
    "separate-autoscaled": K8S / "overlays" / "separate-autoscaled",  # the StatefulSet scaled by one
}
KUBERNETES_VERSION = "1.30.0"
SECRET = "ecobatch-keys"
MODEL_DIR = "/models/mistral-7b-int8"

Obj = dict[str, Any]


# ---- kustomize, as far as these manifests use it ------------------------------------------------------


def _merge(base: Obj, patch: Obj, where: str) -> Obj:
    merged = dict(base)
    for key, value in patch.items():
        if key.startswith("$") or isinstance(value, list):
            raise NotImplementedError(f"{where}.{key}: only mappings and scalars are merged here")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{where}.{key}")
        elif value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@cache
def _build(directory: Path) -> tuple[Obj, ...]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{directory}: kustomize features this loader does not apply: {unsupported}"
    assert (kustomization["apiVersion"], kustomization["kind"]) == (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    )
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += _build(path)
        else:
            assert path.is_relative_to(directory), f"kustomize refuses a file outside {directory}: {entry}"
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only patches from files: {entry}"
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        matches = [i for i, obj in enumerate(objects) if _key(obj) == _key(patch)]
        assert len(matches) == 1, f"{entry['path']}: patches {_key(patch)}, found {len(matches)}"
        (i,) = matches
        assert objects[i]["apiVersion"] == patch["apiVersion"]
        if patch.get("$patch") == "delete":
            del objects[i]
        else:
            objects[i] = _merge(objects[i], patch, entry["path"])
    keys = [_key(obj) for obj in objects]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate objects {sorted(keys)}"
    return tuple(objects)


def build(shape: str) -> list[Obj]:
    return list(_build(SHAPES[shape]))


def the(objects: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [obj for obj in objects if _key(obj) == (kind, name)]
    return found


WORKLOADS = ("Deployment", "StatefulSet")


def pod_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) for every Deployment and StatefulSet."""
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]


def containers(objects: list[Obj], name: str) -> list[tuple[Obj, Obj]]:
    """(pod template, container) for every container or init container with this name."""
    return [
        (template, container)
        for _, template in pod_templates(objects)
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", [])
        if container["name"] == name
    ]


def port(container: Obj, name: str) -> int:
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(number)


def flag(container: Obj, name: str) -> str:
    args = container["args"]
    return str(args[args.index(name) + 1])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


POD_ENV = {"POD_NAME": "ecobatch-vllm-7d4b9-x2x4q", "POD_NAMESPACE": "llm", "NODE_IP": "10.0.0.7"}


def settings(shape: str, tmp_path: Path) -> Settings:
    """ecobatch's settings as its container reads them: the ConfigMap, rendered by the init container."""
    objects = build(shape)
    ((_, init),) = containers(objects, "render-config")
    _, _, script, src, _ = init["command"]
    template = tmp_path / Path(src).name
    template.write_text(the(objects, "ConfigMap", "ecobatch-config")["data"][Path(src).name])
    rendered = tmp_path / "rendered.yaml"
    subprocess.run([sys.executable, "-c", script, str(template), str(rendered)], env=POD_ENV, check=True)
    return load_settings(rendered)


def render_rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_rules", K8S / "render_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes = pytest.mark.parametrize("shape", sorted(SHAPES))


# ---- what is built -----------------------------------------------------------------------------------


@shapes
def test_each_shape_builds_the_expected_objects(shape: str) -> None:
    common = {
        ("ConfigMap", "ecobatch-config"),
        ("PersistentVolumeClaim", "mistral-7b-int8"),
        ("Service", "ecobatch"),
        ("Service", "ecobatch-metrics"),
        ("Service", "llm-engine"),
        ("NetworkPolicy", "ecobatch"),
        ("ServiceMonitor", "ecobatch"),
        ("PrometheusRule", "ecobatch"),
    }
    workloads = {
        "sidecar": {("Deployment", "ecobatch-vllm")},
        "separate": {("Deployment", "ecobatch"), ("StatefulSet", "vllm"), ("NetworkPolicy", "vllm")},
        "autoscaled": {("Deployment", "ecobatch-vllm"), ("HorizontalPodAutoscaler", "ecobatch-vllm")},
        "separate-autoscaled": {
            ("Deployment", "ecobatch"),
            ("StatefulSet", "vllm"),
            ("NetworkPolicy", "vllm"),
            ("HorizontalPodAutoscaler", "vllm"),
        },
    }[shape]
    assert {_key(obj) for obj in build(shape)} == common | workloads


@shapes
def test_every_kubernetes_object_is_valid_for_kubernetes_1_30_strictly(shape: str) -> None:
    errors = []
    for obj in build(shape):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the Prometheus operator's kinds: next test
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{_key(obj)}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert not errors


_DURATION = {
    "type": "string",
    "pattern": r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$",
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}, "labels": _STRINGS, "annotations": _STRINGS},
}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _STRINGS, "matchExpressions": {"type": "array"}},
}
#: the fields these manifests use, named and typed as in prometheus-operator's CRDs (monitoring.coreos.com/v1)
CRD_SCHEMAS: dict[str, Obj] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _SELECTOR,
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "relabelings": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "action": {"enum": ["replace", "keep", "drop", "labelmap"]},
                                            "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                            "targetLabel": {"type": "string"},
                                            "regex": {"type": "string"},
                                            "replacement": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRINGS,
                                            "annotations": _STRINGS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


@shapes
def test_the_prometheus_operator_objects_match_their_crd_schemas(shape: str) -> None:
    crds = [obj for obj in build(shape) if obj["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(obj["kind"] for obj in crds) == ["PrometheusRule", "ServiceMonitor"]
    for obj in crds:
        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])


# ---- ecobatch's configuration --------------------------------------------------------------------------


@shapes
def test_the_config_map_loads_with_ecobatchs_own_loader_once_the_init_container_renders_it(
    shape: str, tmp_path: Path
) -> None:
    s = settings(shape, tmp_path)
    objects = build(shape)
    ((_, ecobatch),) = containers(objects, "ecobatch")
    ((_, vllm),) = containers(objects, "vllm")
    assert s.backend.kind == "vllm-http"
    assert s.server.host == "0.0.0.0"
    assert s.server.port == port(ecobatch, "http")
    assert s.server.metrics_port == port(ecobatch, "metrics")
    assert s.backend.model == s.backend.served_model_name == flag(vllm, "--served-model-name")
    assert s.backend.startup_timeout_s >= 600  # the checkpoint loads from a volume


def test_the_init_container_stops_the_pod_on_a_placeholder_it_has_no_value_for(tmp_path: Path) -> None:
    ((_, init),) = containers(build("sidecar"), "render-config")
    template = tmp_path / "ecobatch.yaml"
    template.write_text("energy:\n  dcgm_labels: {pod: ${POD_NAME}}\n")
    done = subprocess.run(
        [sys.executable, "-c", init["command"][2], str(template), str(tmp_path / "out.yaml")],
        env={},
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "POD_NAME" in done.stderr
    assert not (tmp_path / "out.yaml").exists()


@shapes
def test_ecobatch_reads_the_config_its_init_container_renders_from_the_config_map(shape: str) -> None:
    ((template, init),) = containers(build(shape), "render-config")
    ((_, ecobatch),) = containers(build(shape), "ecobatch")
    python, dash_c, _, src, dst = init["command"]
    assert (python, dash_c) == ("python3", "-c")  # the ecobatch image's interpreter
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    init_mounts = {m["mountPath"]: volumes[m["name"]] for m in init["volumeMounts"]}
    ecobatch_mounts = {m["mountPath"]: volumes[m["name"]] for m in ecobatch["volumeMounts"]}
    assert init_mounts[str(Path(src).parent)]["configMap"]["name"] == "ecobatch-config"
    assert ecobatch["args"][ecobatch["args"].index("--config") + 1] == dst
    assert init_mounts[str(Path(dst).parent)] == ecobatch_mounts[str(Path(dst).parent)]
    assert "emptyDir" in ecobatch_mounts[str(Path(dst).parent)]
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in init["env"]} == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "NODE_IP": "status.hostIP",
    }
    assert set(POD_ENV) == {e["name"] for e in init["env"]}


def test_sidecar_ecobatch_reaches_vllm_on_loopback_in_its_own_pod(tmp_path: Path) -> None:
    upstream = urlsplit(settings("sidecar", tmp_path).backend.upstream)
    objects = build("sidecar")
    ((template, vllm),) = containers(objects, "vllm")
    assert [c["name"] for c in template["spec"]["containers"]] == ["vllm", "ecobatch"]
    assert (upstream.hostname, upstream.port) == ("127.0.0.1", port(vllm, "vllm-http"))


def statefulset_pods(engines: Obj) -> list[str]:
    """The names Kubernetes gives a StatefulSet's pods: <name>-0, <name>-1, ..."""
    return [f"{engines['metadata']['name']}-{i}" for i in range(engines["spec"]["replicas"])]


def test_separate_engines_are_a_statefulset_with_a_headless_service_naming_each_pod() -> None:
    objects = build("separate")
    engines = the(objects, "StatefulSet", "vllm")
    assert engines["spec"]["replicas"] >= 2
    template = engines["spec"]["template"]
    assert [c["name"] for c in template["spec"]["containers"]] == ["vllm"]
    assert "volumeClaimTemplates" not in engines["spec"]  # the model's one claim, shared read-only
    # the governing Service gives each pod the DNS name <pod>.<service>: only a headless one does
    service = the(objects, "Service", engines["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("publishNotReadyAddresses", False) is False  # a loading engine: no name yet
    assert selects(service["spec"]["selector"], template["metadata"]["labels"])
    # nothing reaches the engines load-balanced past ecobatch's routing
    for other in (obj for obj in objects if obj["kind"] == "Service" and obj is not service):
        assert not selects(other["spec"]["selector"], template["metadata"]["labels"]), other["metadata"]


def test_separate_ecobatch_finds_the_statefulsets_ready_pods_through_its_headless_service(
    tmp_path: Path,
) -> None:
    backend = settings("separate", tmp_path).backend
    objects = build("separate")
    engines = the(objects, "StatefulSet", "vllm")
    ((_, vllm),) = containers(objects, "vllm")
    raw = yaml.safe_load(the(objects, "ConfigMap", "ecobatch-config")["data"]["ecobatch.yaml"])
    assert "upstream" not in raw["backend"]  # the replicas, not one load-balanced address
    assert backend.kind == "vllm-http"
    assert backend.routing == "pack"
    assert backend.replicas == []  # none listed: scaling the StatefulSet needs no edit here
    dns = backend.replicas_dns
    assert dns is not None
    # the governing Service's name in ecobatch's own namespace (the search domains add the cluster's)
    service = engines["spec"]["serviceName"]
    assert dns.name.split(".") == [service, POD_ENV["POD_NAMESPACE"], "svc"]
    # a headless Service's name resolves to the pods themselves: the container's port, not a Service port
    assert (dns.scheme, dns.port) == ("http", port(vllm, "vllm-http"))
    assert backend.replicas_refresh_s <= 10  # a pod gone from DNS stops taking requests within that


def replicas_found_by_dns(s: Settings, pods: list[str], service: str) -> list[ReplicaSettings]:
    """The replicas ecobatch's DNS source makes of the StatefulSet's pods: an address each, whose reverse
    name is ``<pod>.<service>.<namespace>.svc.cluster.local`` (Kubernetes' DNS for a headless Service)."""
    assert s.backend.replicas_dns is not None
    addresses = {f"10.0.0.{10 + i}": pod for i, pod in enumerate(pods)}

    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    async def reverse(address: str) -> str:
        return f"{addresses[address]}.{service}.{POD_ENV['POD_NAMESPACE']}.svc.cluster.local"

    return asyncio.run(ReplicasDns(s.backend.replicas_dns, resolve, reverse).replicas())


@shapes
def test_the_in_flight_cap_fits_what_each_engine_admits(shape: str, tmp_path: Path) -> None:
    # the cap applies per engine: to the one upstream, or to each replica
    ((_, vllm),) = containers(build(shape), "vllm")
    assert settings(shape, tmp_path).batching.max_inflight_sequences <= int(flag(vllm, "--max-num-seqs"))


def test_sidecar_energy_is_this_pods_gpu_from_the_nodes_dcgm_exporter(tmp_path: Path) -> None:
    energy = settings("sidecar", tmp_path).energy
    assert energy.meter == "dcgm"
    assert energy.dcgm_url is not None and urlsplit(energy.dcgm_url).path == "/metrics"
    # dcgm-exporter (GPU operator, DCGM_EXPORTER_KUBERNETES=true) labels a GPU with the pod it serves
    assert energy.dcgm_labels == {"namespace": "llm", "pod": "ecobatch-vllm-7d4b9-x2x4q"}
    assert energy.sample_interval_s >= 1.0  # no faster than the exporter collects (README: 1 s)


def test_separate_energy_of_each_replica_is_its_own_pods_gpu_on_the_node_shared_with_ecobatch(
    tmp_path: Path,
) -> None:
    s = settings("separate", tmp_path)
    energy = s.energy
    assert energy.meter == "dcgm"
    assert energy.dcgm_url is not None and urlsplit(energy.dcgm_url).path == "/metrics"
    assert energy.dcgm_labels == {"namespace": "llm", "container": "vllm"}
    assert energy.sample_interval_s >= 1.0
    objects = build("separate")
    engines = the(objects, "StatefulSet", "vllm")
    pods = statefulset_pods(engines)
    replicas = replicas_found_by_dns(s, pods, engines["spec"]["serviceName"])
    assert len(replicas) == len(pods)
    for replica, pod in zip(replicas, pods, strict=True):
        # each replica's energy as ecobatch reads it: exactly that pod's GPU
        own = s.as_replica(replica).energy
        assert own.dcgm_labels == {"namespace": "llm", "container": "vllm", "pod": pod}
        assert own.dcgm_url == energy.dcgm_url  # the exporter of the node they all share
    for kind, name in (("StatefulSet", "vllm"), ("Deployment", "ecobatch")):
        (term,) = the(objects, kind, name)["spec"]["template"]["spec"]["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "vllm"}


# ---- the API keys ----------------------------------------------------------------------------------------


@shapes
def test_no_key_is_committed_and_ecobatch_takes_its_keys_from_the_secret_the_readme_creates(
    shape: str, tmp_path: Path
) -> None:
    objects = build(shape)
    assert not [obj for obj in objects if obj["kind"] == "Secret"]
    s = settings(shape, tmp_path).server
    ((_, ecobatch),) = containers(objects, "ecobatch")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ecobatch["env"]}
    # the API keys are required (no "optional"): without the Secret the pod waits, never serves open
    assert refs[s.api_keys_env or ""] == {"name": SECRET, "key": "api-keys"}
    assert refs[s.admin_keys_env or ""] == {"name": SECRET, "key": "admin-keys", "optional": True}
    readme = (K8S / "README.md").read_text()
    command = re.search(r"kubectl (?:-n \S+ )?create secret generic (\S+)(?:[^\n]*\\\n)*[^\n]*", readme)
    assert command is not None and command.group(1) == SECRET
    assert "--from-literal=api-keys=" in command.group(0) and "--from-literal=admin-keys=" in command.group(0)


# ---- the pods ----------------------------------------------------------------------------------------------


@shapes
def test_workloads_select_their_own_pods(shape: str) -> None:
    for workload, template in pod_templates(build(shape)):
        assert selects(workload["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])


@shapes
def test_every_service_selects_pods_that_have_the_ports_it_targets(shape: str) -> None:
    objects = build(shape)
    for service in (obj for obj in objects if obj["kind"] == "Service"):
        pods = [
            t
            for _, t in pod_templates(objects)
            if selects(service["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for pod in pods:
            ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
            for service_port in service["spec"]["ports"]:
                target = service_port["targetPort"]
                assert any(target in (p["name"], p["containerPort"]) for p in ports), (
                    f"Service {service['metadata']['name']}: no container port {target}"
                )


@shapes
def test_probes_ask_health_and_every_container_is_ready_only_when_health_says_so(shape: str) -> None:
    for _, template in pod_templates(build(shape)):
        for container in template["spec"]["containers"]:
            assert container["readinessProbe"]["httpGet"]["path"] == "/health"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                http = container.get(probe, {}).get("httpGet")
                assert http is None or http["path"] == "/health", (container["name"], probe)


@shapes
def test_vllm_serves_the_pre_quantized_8bit_mistral_from_the_volume_on_one_gpu(shape: str) -> None:
    objects = build(shape)
    for template, vllm in containers(objects, "vllm"):
        assert vllm["image"].startswith("vllm/vllm-openai:")
        assert vllm["args"][0] == MODEL_DIR
        assert {
            flag: vllm["args"][vllm["args"].index(flag) + 1]
            for flag in (
                "--quantization",
                "--max-model-len",
                "--max-num-seqs",
                "--gpu-memory-utilization",
                "--served-model-name",
            )
        } == {
            "--quantization": "bitsandbytes",
            "--max-model-len": "4096",
            "--max-num-seqs": "64",
            "--gpu-memory-utilization": "0.90",
            "--served-model-name": "mistral-7b-int8",
        }
        assert str(port(vllm, "vllm-http")) == flag(vllm, "--port") == "8000"
        assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert vllm[probe]["httpGet"] == {"path": "/health", "port": "vllm-http"}
        (mount,) = [m for m in vllm["volumeMounts"] if m["mountPath"] == MODEL_DIR]
        assert mount["readOnly"] is True
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert the(objects, "PersistentVolumeClaim", claim)


@shapes
def test_no_service_can_pass_for_a_vllm_setting_in_the_pods_environment(shape: str) -> None:
    # Kubernetes puts <SERVICE>_PORT=tcp://... into pods; vLLM reads VLLM_PORT and refuses such a value
    objects = build(shape)
    services = [obj["metadata"]["name"] for obj in objects if obj["kind"] == "Service"]
    assert not [name for name in services if name.replace("-", "_").upper().startswith("VLLM")]
    for _, template in pod_templates(objects):
        assert template["spec"]["enableServiceLinks"] is False


@shapes
def test_ecobatch_runs_as_non_root_without_a_gpu_within_its_resources(shape: str) -> None:
    objects = build(shape)
    for name in ("ecobatch", "render-config"):
        for template, container in containers(objects, name):
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True
            assert security["runAsUser"] > 0
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert template["spec"].get("securityContext", {}).get("runAsUser", 1) != 0
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
            assert "nvidia.com/gpu" not in {**resources["requests"], **resources["limits"]}


def test_sidecar_vllm_outlives_ecobatchs_drain_and_the_pod_outlives_both(tmp_path: Path) -> None:
    drain_s = settings("sidecar", tmp_path).server.shutdown_grace_s + EXIT_AFTER_GRACE_S
    ((template, vllm),) = containers(build("sidecar"), "vllm")
    sleep, seconds = vllm["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and float(seconds) > drain_s
    assert template["spec"]["terminationGracePeriodSeconds"] > float(seconds)


def test_separate_ecobatch_pod_outlives_its_drain(tmp_path: Path) -> None:
    drain_s = settings("separate", tmp_path).server.shutdown_grace_s + EXIT_AFTER_GRACE_S
    ((template, _),) = containers(build("separate"), "ecobatch")
    assert template["spec"]["terminationGracePeriodSeconds"] > drain_s


@shapes
def test_vllms_keyless_api_is_open_only_to_the_scraper_and_ecobatchs_pods(shape: str) -> None:
    objects = build(shape)
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    for template, vllm in containers(objects, "vllm"):
        rules = [
            rule
            for policy in policies
            if selects(policy["spec"]["podSelector"]["matchLabels"], template["metadata"]["labels"])
            for rule in policy["spec"]["ingress"]
            if any(p["port"] == port(vllm, "vllm-http") for p in rule["ports"])
        ]
        assert rules and all(rule.get("from") for rule in rules)
    for template, ecobatch in containers(objects, "ecobatch"):
        open_ports = [
            p["port"]
            for policy in policies
            if selects(policy["spec"]["podSelector"]["matchLabels"], template["metadata"]["labels"])
            for rule in policy["spec"]["ingress"]
            if "from" not in rule
            for p in rule["ports"]
        ]
        assert open_ports == [port(ecobatch, "http")]


# ---- monitoring --------------------------------------------------------------------------------------------


@shapes
def test_the_service_monitor_scrapes_ecobatch_and_vllm_as_the_jobs_the_rules_name(
    shape: str, tmp_path: Path
) -> None:
    objects = build(shape)
    monitor = the(objects, "ServiceMonitor", "ecobatch")
    services = [
        obj
        for obj in objects
        if obj["kind"] == "Service"
        and selects(monitor["spec"]["selector"]["matchLabels"], obj["metadata"].get("labels", {}))
    ]
    scraped: dict[str, int] = {}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        (job,) = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        (target,) = [
            p["targetPort"] for s in services for p in s["spec"]["ports"] if p["name"] == endpoint["port"]
        ]
        ((_, container),) = [
            (t, c)
            for _, t in pod_templates(objects)
            for c in t["spec"]["containers"]
            if any(p["name"] == target for p in c.get("ports", []))
        ]
        scraped[job] = port(container, target)
    ((_, vllm),) = containers(objects, "vllm")
    assert scraped == {
        "ecobatch": settings(shape, tmp_path).server.metrics_port,
        "vllm": port(vllm, "vllm-http"),
    }
    rules = RULES.read_text()
    assert 'up{job="ecobatch"}' in rules and 'up{job="vllm"}' in rules


def test_the_prometheus_rule_carries_the_canonical_rule_files_groups() -> None:
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == render_rules().render(RULES.read_text()), "run: python deploy/k8s/render_rules.py"
    assert yaml.safe_load(committed)["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_the_alerts_cover_energy_regressions_saturation_shedding_the_upstream_and_modelled_energy() -> None:
    rule = the(build("sidecar"), "PrometheusRule", "ecobatch")
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}
    assert {
        "EcobatchJoulesPerRequestRegression",
        "EcobatchQueueNearlyFull",
        "EcobatchRequestsShed",
        "EcobatchUpstreamDown",
        "EcobatchEnergyModelledBesideGpu",
    } <= alerts


def test_render_rules_check_says_whether_the_manifest_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert render_rules().main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["autoscaled", "separate-autoscaled"])
def test_the_autoscaler_scales_the_engines_on_the_signal_ecobatch_exports(shape: str, tmp_path: Path) -> None:
    """The HPA targets the engines (sidecar: the Deployment whose pods are an engine and its ecobatch each;
    separate: the StatefulSet of engines, which ecobatch follows through DNS, so nothing else changes as it
    scales) and reads ecobatch_replicas_needed, a gauge ecobatch exports, as an external metric."""
    from prometheus_client import CollectorRegistry

    from ecobatch.serving.metrics import Metrics

    objects = build(shape)
    (hpa,) = [obj for obj in objects if obj["kind"] == "HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    workload = the(objects, target["kind"], target["name"])
    assert workload["apiVersion"] == target["apiVersion"]
    assert "vllm" in {c["name"] for c in workload["spec"]["template"]["spec"]["containers"]}
    if target["kind"] == "StatefulSet":  # the engines alone: ecobatch must find the pods it adds
        backend = settings(shape, tmp_path).backend
        assert backend.replicas_dns is not None and backend.replicas == []
        assert backend.replicas_dns.name.split(".")[0] == workload["spec"]["serviceName"]
    else:
        assert "ecobatch" in {c["name"] for c in workload["spec"]["template"]["spec"]["containers"]}
    ((metric,),) = [[m for m in hpa["spec"]["metrics"] if m["type"] == "External"]]
    name = metric["external"]["metric"]["name"]
    registry = CollectorRegistry()
    Metrics(registry, model="m", carbon_g_per_kwh=1, price_per_kwh=1, currency="USD")
    exported = {family.name for family in registry.collect()}
    assert name in exported, f"{name} is not a series ecobatch exports"
    assert metric["external"]["target"]["type"] == "AverageValue"  # desired = ceil(sum / averageValue)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

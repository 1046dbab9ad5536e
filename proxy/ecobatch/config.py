"""Typed settings, loaded from YAML and overridden by CLI flags.

Every section is a frozen msgspec ``Struct``: each field's type and limits are declared once, on the
field (``Annotated[float, Meta(ge=0)]``), and checked when a section is built from YAML, flags or a PUT
(``build_section``: ``msgspec.convert``); the limits between fields are checked in ``__post_init__``. An
unknown key, a wrong type or a value out of range raises ``ConfigError`` naming the full dotted key
(``batching.window_max_ms``), the value and the limit. Nothing falls back silently. A section
constructed in code (``BatchingSettings(max_queue=8)``) runs only its ``__post_init__`` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import msgspec
import yaml
from msgspec import Meta, Struct, field

from .errors import ConfigError
from .serving.routing import RoutingPolicy
from .validation import MISSING, explain, value_at

__all__ = [
    "BACKEND_KINDS",
    "BACKEND_SHAPES",
    "DEFAULT_PROFILES",
    "METER_KINDS",
    "RENAMED",
    "BackendSettings",
    "BatchingSettings",
    "EnergySettings",
    "ReplicaSettings",
    "ReplicasDnsSettings",
    "ServerSettings",
    "Settings",
    "build_section",
    "load_settings",
    "read_replicas_file",
]

BackendKind = Literal["simulated", "vllm-http", "vllm-async", "hf-bnb"]
BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)
#: static engines run one padded batch at a time; continuous engines batch whatever is in flight
BACKEND_SHAPES: dict[str, str] = {
    "simulated": "static",
    "hf-bnb": "static",
    "vllm-http": "continuous",
    "vllm-async": "continuous",
}
_DATA = Path(__file__).parent / "data"
#: the embedded reference profile for each engine shape (used when energy.profile is null)
DEFAULT_PROFILES: dict[str, Path] = {
    "static": _DATA / "a800-mistral7b-int8-reference.yaml",
    "continuous": _DATA / "h200-vllm-mistral7b-bf16-reference.yaml",
}


#: batching settings that only one engine shape reads: set for the other, they would do nothing
SHAPE_ONLY_SETTINGS: dict[str, str] = {
    "window_min_ms": "static",
    "window_max_ms": "static",
    "max_batch_sequences": "static",
    "slo_ms": "static",
    "energy_tolerance": "static",
    "interactive_budget_ms": "continuous",
    "flex_budget_ms": "continuous",
    "tpot_slo_ms": "continuous",
    "max_inflight_sequences": "continuous",
    "min_saving_fraction": "continuous",
}

#: the longest a tier's budget may be: a request waiting in the queue must have a bound (NaN and inf fail)
MAX_BUDGET_MS = 3_600_000.0

# ---- limits more than one field shares
_Port = Annotated[int, Meta(ge=0, le=65535)]
_HttpUrl = Annotated[str, Meta(pattern="^https?://", description="an http:// or https:// URL")]
_Positive = Annotated[float, Meta(gt=0)]
_NonNegative = Annotated[float, Meta(ge=0)]
#: a power: finite (at most 100 kW, beyond any one proxy's GPUs)
_Watts = Annotated[float, Meta(ge=0, le=100_000)]
_PositiveWatts = Annotated[float, Meta(gt=0, le=100_000)]
_AtLeastOne = Annotated[int, Meta(ge=1)]
_Fraction = Annotated[float, Meta(ge=0, lt=1)]
_Budget = Annotated[
    float, Meta(ge=0, le=MAX_BUDGET_MS, description="an hour at most: a queued request needs a bound")
]


def _require(ok: bool, name: str, value: object, limit: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} must be {limit}", field=name)


class ServerSettings(Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: _Port = 8080
    # On SIGTERM: new requests get 503; queued and in-flight ones get this long to finish.
    shutdown_grace_s: _NonNegative = 30.0
    # Bearer keys for /v1 and /ecobatch/energy: a file (one per line) and/or an environment variable
    # (comma-separated). None configured: those routes are open (a warning at start-up).
    api_keys_file: str | None = None
    api_keys_env: str | None = "ECOBATCH_API_KEYS"
    # Keys for the admin routes (/ecobatch/batching); none configured: those routes are disabled.
    admin_keys_file: str | None = None
    admin_keys_env: str | None = "ECOBATCH_ADMIN_KEYS"
    # Serve /metrics on its own port (and not on the main one); None: on the main port.
    metrics_port: _Port | None = None
    # Request limits: a larger body is a 413, larger header lines a 400, more prompts in one
    # /v1/completions request (a list prompt) a 400.
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 8190
    max_prompts_per_request: _AtLeastOne = 64


class ReplicaSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """One vLLM replica behind a ``vllm-http`` backend, and where its GPU's energy is read."""

    url: _HttpUrl
    # A name for metrics, logs and /health (None: "r0", "r1", … in the order listed).
    name: str | None = None
    # This replica's GPUs: NVML indices on this host, or dcgm-exporter's `gpu` label values.
    gpu_indices: list[int] | None = None
    # dcgm-exporter beside this replica's GPU (None: energy.dcgm_url, with dcgm_labels to pick its series).
    dcgm_url: _HttpUrl | None = None
    dcgm_labels: dict[str, str] = {}

    def energy_settings(self, base: EnergySettings) -> EnergySettings:
        """``base`` (the energy section) with this replica's GPUs: its own selectors where it has them."""
        return msgspec.structs.replace(
            base,
            gpu_indices=base.gpu_indices if self.gpu_indices is None else self.gpu_indices,
            dcgm_url=self.dcgm_url or base.dcgm_url,
            dcgm_labels={**base.dcgm_labels, **self.dcgm_labels},
        )


class ReplicasDnsSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """The replicas at a DNS name's addresses (a Kubernetes headless Service: one address per ready pod),
    each reached at ``scheme://address:port``."""

    # The name looked up, e.g. vllm-headless.llm.svc.cluster.local (a short name goes through the search
    # domains of /etc/resolv.conf, as any lookup on the host does).
    name: Annotated[
        str,
        Meta(
            pattern=r"^[^/:@ ]+$",
            description="a DNS name without scheme, port or path (e.g. vllm-headless.llm.svc.cluster.local)",
        ),
    ]
    # Where vLLM listens on each address: a headless Service's name resolves to the pods themselves, so
    # this is the container's port, not a Service port.
    port: Annotated[int, Meta(ge=1, le=65535)] = 8000
    scheme: Literal["http", "https"] = "http"
    # Which addresses are replicas: ipv4 (A records) or ipv6 (AAAA). One family only: a dual-stack pod
    # has one of each, and would otherwise be two replicas on one GPU.
    family: Literal["ipv4", "ipv6"] = "ipv4"
    # dcgm-exporter's label that names the pod a GPU is allocated to (the GPU operator's `pod`): each
    # replica's energy is read from the series whose label is its pod's name, found by a reverse lookup
    # of its address (a StatefulSet's pod behind its headless Service: vllm-0.vllm-headless... -> vllm-0).
    # None: the replicas' GPUs are not told apart (energy.meter: model, or not dcgm-exporter).
    dcgm_pod_label: (
        Annotated[str, Meta(min_length=1, description="a dcgm-exporter label name (e.g. pod)")] | None
    ) = None

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and not any(c in self.name for c in "/:@ "),
            "backend.replicas_dns.name",
            self.name,
            "a DNS name without scheme, port or path (e.g. vllm-headless.llm.svc.cluster.local)",
        )


_DEFAULT_UPSTREAM = "http://127.0.0.1:8000"


def url_key(url: str) -> str:
    """A URL as a server sees it: scheme and host in any case, a trailing slash or not."""
    parts = urlsplit(url.rstrip("/"))
    return parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()


class BackendSettings(Struct, frozen=True, forbid_unknown_fields=True):
    kind: BackendKind = "simulated"
    upstream: _HttpUrl = _DEFAULT_UPSTREAM
    # vllm-http: the upstream's model name (None: ask its /v1/models). vllm-async / hf-bnb: a path or name.
    model: str | None = None
    # The name clients use; None: the model's own name (simulated: "mistral-7b-int8-sim").
    served_model_name: str | None = None
    request_timeout_s: _Positive = 600.0
    connect_timeout_s: _Positive = 10.0
    # vllm-http: how long start-up waits for the upstream to answer /v1/models.
    startup_timeout_s: _NonNegative = 600.0
    # Simulated backend: 1.0 = real time from the profile, 0 = instant.
    sim_time_scale: _NonNegative = 1.0
    # Simulated backend: prompt + max_tokens limit (None: the profile's meta.max_model_len, else 4096).
    # The other backends read it from the engine.
    context_length: Annotated[int, Meta(ge=2)] | None = None
    # How often a remote engine's /metrics is read: KV headroom, and a health probe.
    headroom_poll_s: _Positive = 1.0
    # vllm-http: that many failures in a row (probes or requests) and the upstream is taken to be down:
    # requests get 503 at once until a probe succeeds. A probe waits at most probe_timeout_s.
    breaker_failures: _AtLeastOne = 3
    probe_timeout_s: _Positive = 2.0
    # vllm-http: pass request fields that neither OpenAI's API nor vLLM's extensions define to vLLM
    # (which may ignore them) instead of refusing them with a 400.
    pass_unknown_fields: bool = False
    # vllm-async: extra AsyncEngineArgs fields, e.g. {max_model_len: 4096, enforce_eager: true}.
    engine_args: dict[str, Any] = {}
    # vllm-http: several vLLM replicas of the same model instead of `upstream` (see `routing`), each
    # with its own in-flight cap, KV headroom, circuit breaker and energy meter.
    replicas: list[ReplicaSettings] = []
    # vllm-http: the replicas listed in a YAML file instead (the same fields as `replicas`, or plain
    # URLs), read again every replicas_refresh_s once it changes: a replica added joins without a
    # restart, one removed takes no new request and leaves once its requests have ended, each with its
    # meter. A Kubernetes ConfigMap mounted as a file is kept current by the kubelet.
    replicas_file: str | None = None
    # vllm-http: the replicas at a DNS name's addresses instead (a Kubernetes headless Service's ready
    # pods), looked up again every replicas_refresh_s: an address that appears joins, one that goes
    # leaves once its requests have ended, as with replicas_file.
    replicas_dns: ReplicasDnsSettings | None = None
    replicas_refresh_s: _Positive = 5.0
    # pack: fill the fullest replica with room (under its safety limit) before waking the next;
    # round-robin: the next replica in turn with room.
    routing: RoutingPolicy = "pack"
    # vLLM started with `--scheduling-policy priority`: send each request's tier as vLLM's `priority`
    # (priority -1, interactive 0, flex 1; lower runs first), so that inside the engine interactive work
    # goes ahead of flex. Off: no priority is sent (vLLM refuses one it does not schedule by).
    engine_priority: bool = False

    @property
    def replica_names(self) -> list[str]:
        """Each replica's name: its own, else "r0", "r1", … in the order listed."""
        return [r.name or f"r{i}" for i, r in enumerate(self.replicas)]

    def __post_init__(self) -> None:
        urls = [url_key(r.url) for r in self.replicas]
        _require(
            not self.replicas or self.kind == "vllm-http",
            "backend.replicas",
            urls,
            "empty unless backend.kind is 'vllm-http' (--backend vllm-http)",
        )
        _require(
            not self.replicas or self.upstream == _DEFAULT_UPSTREAM,
            "backend.upstream",
            self.upstream,
            "unset when backend.replicas lists the upstreams",
        )
        _require(
            self.replicas_dns is None or self.kind == "vllm-http",
            "backend.replicas_dns",
            self.replicas_dns and self.replicas_dns.name,
            "unset unless backend.kind is 'vllm-http' (--backend vllm-http)",
        )
        _require(
            self.replicas_dns is None or not self.replicas,
            "backend.replicas",
            urls,
            "empty when backend.replicas_dns finds the replicas (the replicas come from one source)",
        )
        _require(
            self.replicas_dns is None or self.upstream == _DEFAULT_UPSTREAM,
            "backend.upstream",
            self.upstream,
            "unset when backend.replicas_dns finds the upstreams",
        )
        names = self.replica_names
        _require(len(set(names)) == len(names), "backend.replicas[].name", names, "unique")
        _require(len(set(urls)) == len(urls), "backend.replicas[].url", urls, "unique")
        _require(
            self.kind not in ("vllm-async", "hf-bnb") or bool(self.model),
            "backend.model",
            self.model,
            f"a model path or name for backend.kind={self.kind!r}",
        )


class BatchingSettings(Struct, frozen=True, forbid_unknown_fields=True):
    # ---- both engine shapes
    max_queue: _AtLeastOne = 1024
    # Static engines: pick the smallest batch whose J/token is within this fraction of the best the curve
    # offers.
    energy_tolerance: _Fraction = 0.05
    # Completion length planned for until real ones are observed (requests without max_tokens).
    expected_completion_tokens: _AtLeastOne = 256
    expected_prompt_tokens: Annotated[int, Meta(ge=0)] = 128
    # ---- static engines (hf-bnb, simulated): the adaptive window and the batch
    window_min_ms: _NonNegative = 50.0
    window_max_ms: float = 100.0
    # The most sequences one GPU batch holds.
    max_batch_sequences: _AtLeastOne = 64
    # Latency objective for one request, end to end (queue + window + generation).
    slo_ms: _Positive = 30_000.0
    # ---- continuous engines (vllm-http, vllm-async): the run-time release controller
    # Time to first token each tier allows (service_tier auto/default: interactive; flex; priority is
    # never held). A request is released by its budget minus the engine's measured time to first token.
    interactive_budget_ms: _Budget = 100.0
    flex_budget_ms: _Budget = 30_000.0
    # Inter-token latency objective: at most as many sequences in flight per replica as keep one decode
    # step (the profile's, at the engine's measured speed) under it. None: no such limit.
    tpot_slo_ms: _Positive | None = None
    # Hard limit on sequences in flight per replica (e.g. vLLM's --max-num-seqs, beyond which requests
    # queue inside vLLM). None: KV room and tpot_slo_ms alone limit it.
    max_inflight_sequences: _AtLeastOne | None = None
    # Hold an idle engine's interactive arrivals only if the predicted saving is at least this share of
    # the energy their release would start.
    min_saving_fraction: _Fraction = 0.02
    # The sliding window of the live estimates (arrival rate, length mix).
    load_window_s: Annotated[float, Meta(gt=0, le=600)] = 10.0

    @property
    def interactive_budget_s(self) -> float:
        return self.interactive_budget_ms / 1000.0

    @property
    def flex_budget_s(self) -> float:
        return self.flex_budget_ms / 1000.0

    def __post_init__(self) -> None:
        _require(
            self.window_max_ms >= self.window_min_ms,
            "batching.window_max_ms",
            self.window_max_ms,
            f">= batching.window_min_ms ({self.window_min_ms})",
        )
        _require(
            self.flex_budget_ms >= self.interactive_budget_ms,
            "batching.flex_budget_ms",
            self.flex_budget_ms,
            f">= batching.interactive_budget_ms ({self.interactive_budget_ms:g}): flex may wait longer",
        )


MeterKind = Literal["auto", "nvml", "dcgm", "model"]
METER_KINDS: tuple[str, ...] = get_args(MeterKind)


class EnergySettings(Struct, frozen=True, forbid_unknown_fields=True):
    # auto: dcgm where dcgm_url is set; else NVML where the engine runs on this host and a GPU is found;
    # else modelled (announced). Never this host's GPUs for a remote upstream.
    meter: MeterKind = "auto"
    # dcgm-exporter's /metrics on the GPU host (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, mJ since boot).
    dcgm_url: _HttpUrl | None = None
    # Only dcgm series with these labels (e.g. {Hostname: gpu-node-1}) are summed.
    dcgm_labels: dict[str, str] = {}
    # GPUs whose energy is summed (NVML index, or dcgm's `gpu` label); None: all (NVML: all that
    # CUDA_VISIBLE_DEVICES allows).
    gpu_indices: list[int] | None = None
    sample_interval_s: Annotated[float, Meta(ge=0.01, le=5)] = 0.1
    # None: measured at start-up (1 s, before any work), then re-estimated live whenever nothing runs
    # (live_idle); a number: that, fixed (set it on a GPU shared with work the engine does not see).
    idle_power_w: _Watts | None = None
    # Re-estimate idle power from the counter while nothing runs (median of the last 31 quiet seconds).
    live_idle: bool = True
    # After a request's end, the energy above idle that the counter still reports (the power's decay,
    # any of the counter's lag counter_lag_s does not undo) for this long is charged to the requests that
    # just ended, not to other work.
    tail_s: Annotated[float, Meta(ge=0, le=10)] = 1.0
    # How late the counter reports the energy the GPUs drew: each interval is placed this much earlier,
    # so that a request's energy lands on it and not on the requests after it. None: the profile's
    # measured counter_lag_s (`ecobatch calibrate`), else 0.
    counter_lag_s: Annotated[float, Meta(ge=0, le=5)] | None = None
    # The most the measured GPUs can draw, summed: while ecobatch's requests run they are charged at
    # most this × their busy time (the rest is another client's). None: the GPUs' power limit as NVML or
    # dcgm-exporter (DCGM_FI_DEV_POWER_MGMT_LIMIT) reports it; no cap where neither does.
    max_power_w: _PositiveWatts | None = None
    # Energy profile (YAML); None: the embedded reference for the engine's shape (static: A800 INT8
    # seed table; continuous: H200 vLLM bf16 curve), both source: reference.
    profile: str | None = None
    # Weight of one prompt token against one generated token when an interval's joules are split, where
    # the profile has no measured prefill energy (prefill_joules_per_token; `ecobatch calibrate` measures
    # it): then the weight is measured prefill / decode energy above idle at the interval's concurrency.
    prefill_weight: _NonNegative = 1.0
    # Defaults are the seed data's (China grid, $0.04/kWh): set your own grid and tariff.
    carbon_g_per_kwh: _NonNegative = 555.0
    price_per_kwh: _NonNegative = 0.04
    currency: Annotated[str, Meta(min_length=1)] = "USD"

    def profile_path(self, shape: str) -> Path:
        """The profile file: the configured one, or the embedded reference for the engine's shape."""
        return Path(self.profile) if self.profile else DEFAULT_PROFILES[shape]


class Settings(Struct, frozen=True, forbid_unknown_fields=True):
    server: ServerSettings = field(default_factory=ServerSettings)
    backend: BackendSettings = field(default_factory=BackendSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    energy: EnergySettings = field(default_factory=EnergySettings)

    def __post_init__(self) -> None:
        energy, replicas = self.energy, self.backend.replicas
        every_replica_has_one = bool(replicas) and all(r.dcgm_url for r in replicas)
        _require(
            energy.meter != "dcgm" or energy.dcgm_url is not None or every_replica_has_one,
            "energy.dcgm_url",
            energy.dcgm_url,
            "set when energy.meter is 'dcgm' (dcgm-exporter's /metrics URL; or each replica's dcgm_url)",
        )
        for i, r in enumerate(replicas):
            dcgm = r.dcgm_url or energy.dcgm_url
            _require(
                not (r.dcgm_labels or r.dcgm_url) or energy.meter != "nvml",
                f"backend.replicas[{i}].dcgm_labels",
                r.dcgm_labels or r.dcgm_url,
                f"unset while energy.meter is {energy.meter!r} (they select dcgm-exporter series)",
            )
            _require(
                not r.dcgm_labels or dcgm is not None,
                f"backend.replicas[{i}].dcgm_labels",
                r.dcgm_labels,
                "used with a dcgm-exporter URL: set energy.dcgm_url or this replica's dcgm_url",
            )
        self._refuse_same_dcgm_series()
        self._check_replicas_dns()

    def _check_replicas_dns(self) -> None:
        """Replicas found by DNS are other hosts, told apart on dcgm-exporter by their pods' names only."""
        dns, energy = self.backend.replicas_dns, self.energy
        if dns is None:
            return
        _require(
            energy.meter != "nvml",
            "energy.meter",
            energy.meter,
            "'dcgm', 'model' or 'auto' with backend.replicas_dns (its replicas' GPUs are not this host's)",
        )
        dcgm = energy.meter == "dcgm" or (energy.meter == "auto" and energy.dcgm_url is not None)
        _require(
            dns.dcgm_pod_label is not None or not dcgm,
            "backend.replicas_dns.dcgm_pod_label",
            dns.dcgm_pod_label,
            "set (e.g. pod) when energy is read from dcgm-exporter (energy.dcgm_url): without it every "
            "replica would read the same GPUs and their joules would be charged twice",
        )
        _require(
            dns.dcgm_pod_label is None or dcgm,
            "backend.replicas_dns.dcgm_pod_label",
            dns.dcgm_pod_label,
            "null unless energy is read from dcgm-exporter (energy.dcgm_url set, energy.meter dcgm or auto)",
        )

    def for_replica(self, index: int) -> Settings:
        """The settings as replica ``index`` sees them: its upstream, and its own GPUs (its energy
        selectors over the energy section's)."""
        return self.as_replica(self.backend.replicas[index])

    def as_replica(self, replica: ReplicaSettings) -> Settings:
        """The settings as ``replica`` sees them (one listed, or one a replicas file or DNS adds later)."""
        backend = msgspec.structs.replace(self.backend, upstream=replica.url, replicas=[], replicas_dns=None)
        return msgspec.structs.replace(self, backend=backend, energy=replica.energy_settings(self.energy))

    def _refuse_same_dcgm_series(self) -> None:
        """Two replicas selecting the same series of the same dcgm-exporter would each be charged the
        same GPUs' joules: refused before start-up (the exporter need not be up to see it)."""
        energy = self.energy
        seen: dict[tuple[str, tuple[tuple[str, str], ...], tuple[int, ...]], int] = {}
        if energy.meter not in ("auto", "dcgm"):
            return
        for i, r in enumerate(self.backend.replicas):
            own = r.energy_settings(energy)
            url = own.dcgm_url
            if url is None:
                continue
            key = (url, tuple(sorted(own.dcgm_labels.items())), tuple(own.gpu_indices or ()))
            if key in seen:
                raise ConfigError(
                    f"backend.replicas[{seen[key]}] and backend.replicas[{i}] select the same series of "
                    f"dcgm-exporter {url} (their GPUs' joules would be charged twice): give each replica its "
                    "own dcgm_labels (e.g. {gpu: '0'}), gpu_indices or dcgm_url, in a config file",
                    field="backend.replicas",
                )
            seen[key] = i


#: settings that were renamed (one name had several meanings): refused, naming the replacement
RENAMED: dict[str, str] = {
    "batching.max_batch_size": (
        "batching.max_batch_sequences (static engines: the most sequences in one GPU batch), "
        "batching.max_inflight_sequences (continuous engines: a hard limit on sequences in flight per "
        "replica; the controller needs none) or server.max_prompts_per_request (prompts in one request)"
    ),
}


_S = TypeVar("_S", bound=Struct)


def _labels_as_strings(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``dcgm_labels`` with number values as strings: YAML reads ``{gpu: 0}`` as a number, Prometheus
    labels are strings."""
    labels = data.get("dcgm_labels")
    if not isinstance(labels, dict):
        return data
    number = (int, float)
    as_text = {
        k: str(v) if isinstance(v, number) and not isinstance(v, bool) else v for k, v in labels.items()
    }
    return {**data, "dcgm_labels": as_text}


def build_section(cls: type[_S], data: Mapping[str, Any], prefix: str) -> _S:
    """A settings section from its keys (YAML, flags, a PUT), each checked against the schema; a
    ``ConfigError`` names the first bad key in full (``backend.replicas[1].url``) and its limit."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}={data!r} must be a mapping", field=prefix)
    for key in data:
        if f"{prefix}.{key}" in RENAMED:
            raise ConfigError(
                f"{prefix}.{key} is no longer a setting: use {RENAMED[f'{prefix}.{key}']}",
                field=f"{prefix}.{key}",
            )
    data = _labels_as_strings(data)
    if isinstance(data.get("replicas"), list):  # backend.replicas: each entry's labels
        data = {
            **data,
            "replicas": [r if not isinstance(r, dict) else _labels_as_strings(r) for r in data["replicas"]],
        }
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        if isinstance(exc.__cause__, ConfigError):  # a check between fields (__post_init__)
            raise exc.__cause__ from None
        raise _config_error(exc, cls, data, prefix) from None


def _config_error(error: msgspec.ValidationError, cls: type[Any], data: Any, prefix: str) -> ConfigError:
    invalid = explain(error, cls, object_noun="a mapping")
    name = f"{prefix}.{invalid.path}" if invalid.path else prefix
    if invalid.problem == "unknown":
        return ConfigError(f"{name} is not a setting; known: {list(invalid.known)}", field=name)
    if invalid.problem == "missing":
        return ConfigError(f"{name} is required", field=name)
    if invalid.problem == "other":
        return ConfigError(f"{name}: {invalid.limit}", field=name)
    value = value_at(data, invalid.path)
    shown = "" if value is MISSING else f"={value!r}"
    return ConfigError(f"{name}{shown} must be {invalid.limit}", field=name)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "backend": BackendSettings,
    "batching": BatchingSettings,
    "energy": EnergySettings,
}


#: settings that name files: a relative path in a config file is relative to that file
_PATH_FIELDS = (
    ("backend", "replicas_file"),
    ("energy", "profile"),
    ("server", "api_keys_file"),
    ("server", "admin_keys_file"),
)


def _resolve_paths(raw: dict[str, dict[str, Any]], base: Path) -> None:
    for section, key in _PATH_FIELDS:
        value = raw[section].get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            raw[section][key] = str(base / value)


def load_settings(path: str | Path | None = None, overrides: Mapping[str, object] | None = None) -> Settings:
    """Settings from a YAML file (optional) with dotted overrides applied on top.

    ``overrides`` maps ``"section.field"`` to a value; ``None`` values are ignored (flag not given).
    """
    raw: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections {sorted(_SECTIONS)}")
        for name, body in loaded.items():
            if name not in _SECTIONS:
                raise ConfigError(f"{name} is not a config section; known: {sorted(_SECTIONS)}")
            if body is not None:
                if not isinstance(body, dict):
                    raise ConfigError(f"{name}={body!r} must be a mapping")
                raw[name].update(body)
        _resolve_paths(raw, Path(path).parent)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise ConfigError(
                f"override {dotted!r} must be 'section.field' with a section in {sorted(_SECTIONS)}"
            )
        raw[section][key] = value
    replicas_file = raw["backend"].get("replicas_file")
    if replicas_file is not None and raw["backend"].get("replicas_dns") is not None:
        raise ConfigError(
            "backend.replicas_file and backend.replicas_dns are both set: the replicas come from one source",
            field="backend.replicas_dns",
        )
    if replicas_file is not None:
        if raw["backend"].get("replicas"):
            raise ConfigError(
                "backend.replicas_file and backend.replicas are both set: list the replicas in one place",
                field="backend.replicas_file",
            )
        raw["backend"]["replicas"] = [
            msgspec.structs.asdict(r) for r in read_replicas_file(str(replicas_file))
        ]
    built = {name: build_section(cls, raw[name], name) for name, cls in _SECTIONS.items()}
    return Settings(**built)


def read_replicas_file(path: str) -> list[ReplicaSettings]:
    """The replicas a ``backend.replicas_file`` lists: a YAML list of URLs or of ``backend.replicas``
    entries. One without a name is named by its host and port (stable while the file changes)."""
    where, field_name = f"backend.replicas_file={path!r}", "backend.replicas_file"
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})", field=field_name) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}", field=field_name) from None
    if not isinstance(loaded, list) or not loaded:
        raise ConfigError(f"{where}: must be a non-empty YAML list of replicas", field=field_name)
    replicas = []
    for i, entry in enumerate(loaded):
        body = {"url": entry} if isinstance(entry, str) else entry
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: entry {i} must be a URL or a mapping", field=field_name)
        try:
            replica = build_section(ReplicaSettings, body, "backend.replicas[]")
        except ConfigError as exc:
            raise ConfigError(f"{where}: entry {i}: {exc}", field=field_name) from None
        if replica.name is None:
            replica = msgspec.structs.replace(replica, name=urlsplit(replica.url).netloc)
        replicas.append(replica)
    names = [r.name for r in replicas if r.name is not None]  # each has one by now
    for what, values in (("name", names), ("URL", [url_key(r.url) for r in replicas])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ConfigError(f"{where}: two replicas with the same {what}: {twice}", field=field_name)
    return replicas

"""``ecobatch plan``: GPUs, kWh, cost and CO2 for a request volume, from an energy profile.

A model on the profile's curve (a **model**, labelled so in the output):

* each GPU gets an equal share of the traffic (Poisson arrivals, the given lengths, ``--flex-share`` of
  them flex) and runs it through ``ecobatch tune``'s engine model (``tune.sim``). The GPUs needed are
  the fewest that keep the modelled p99 of the interactive requests within the SLO (and every flex
  request within its budget);
* continuous engines (vLLM): the **operating point** is ecobatch's run-time controller with its
  default settings (the same decision code the proxy runs); the comparison is **vLLM direct**
  (everything sent at once);
* static engines: the operating point is the batch size and window (50-100 ms, ecobatch's default, up
  to 4 s) whose GPUs spend the fewest joules per request; the comparison is **per-request serving**
  (batch 1, no window);
* energy per month = the GPUs' energy (busy and idle) × PUE; cost = kWh × price; CO2 = kWh × the
  grid's intensity.

VRAM per batch is shown two ways: the reference guide's rule of thumb for Mistral-7B INT8 (7 GB of
weights + 0.7 GB per request: 0.5 GB of KV cache at 256 tokens and 0.2 GB of activations), and the
exact arithmetic from the model's configuration (weights = parameters × bytes per weight; KV cache =
2 × layers × KV heads × head dim × bytes × tokens per sequence × sequences).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from ..config import BatchingSettings, EnergySettings
from ..profile import EnergyProfile
from .bench.workload import parse_lengths, poisson, with_tiers
from .tune.sim import (
    BatcherRule,
    Controller,
    Policy,
    Result,
    SendAtOnce,
    simulate_continuous,
    simulate_static,
)

__all__ = [
    "ModelShape",
    "PlanInput",
    "add_arguments",
    "kv_bytes",
    "plan",
    "render",
    "run_cli",
    "weight_bytes",
]

SECONDS_PER_MONTH = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The MistralConfig fields that set a model's cost (defaults: Mistral-7B)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 32768

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = int(config["num_attention_heads"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            max_position_embeddings=int(config.get("max_position_embeddings") or 32768),
        )

    @property
    def parameters(self) -> int:
        h, q, kv = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        )
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        return 2 * self.vocab_size * h + self.num_hidden_layers * (attention + mlp + 2 * h) + h


def weight_bytes(shape: ModelShape, quantization: str | None) -> float:
    q = (quantization or "").lower()
    per_weight = 1.0 if any(k in q for k in ("int8", "fp8", "8-bit", "w8a8")) else 2.0
    return shape.parameters * per_weight


def kv_bytes(shape: ModelShape, tokens_per_sequence: float, sequences: int, dtype_bytes: int = 2) -> float:
    per_token = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * dtype_bytes
    return per_token * tokens_per_sequence * sequences


@dataclass(frozen=True, slots=True)
class PlanInput:
    rate_per_s: float
    prompt_tokens: float
    output_tokens: str  # a length spec: N, uniform:A-B, choice:A,B,… or lognormal:MEDIAN,SIGMA,MAX
    slo_p99_s: float
    price_per_kwh: float
    carbon_g_per_kwh: float
    pue: float
    flex_share: float = 0.0


def _sizes(profile: EnergyProfile) -> list[int]:
    return [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s <= profile.max_size]


#: the hold windows (ms) plan tries; 50-100 ms is ecobatch's default
WINDOWS_MS = ((50.0, 100.0), (500.0, 500.0), (1000.0, 1000.0), (2000.0, 2000.0), (4000.0, 4000.0))


Setting = Policy | BatcherRule


def _simulate(profile: EnergyProfile, inp: PlanInput, setting: Setting, gpus: int) -> Result:
    """One GPU's share of the traffic, through ``setting``."""
    rate = inp.rate_per_s / gpus
    duration = min(7200.0, max(60.0, 800.0 / rate))  # about 800 requests per GPU
    output = parse_lengths(inp.output_tokens, "--output-tokens")
    arrivals = poisson(rate, parse_lengths("1", "prompt"), output, duration_s=duration, count=None, seed=0)
    if isinstance(setting, BatcherRule):
        return simulate_static(profile, arrivals, setting)
    arrivals = with_tiers(arrivals, flex_share=inp.flex_share, tier="interactive", seed=0)
    return simulate_continuous(profile, arrivals, setting)


def _meets(result: Result, inp: PlanInput, setting: Setting) -> bool:
    if isinstance(setting, BatcherRule) or not result.tiers:
        return result.p99_s <= inp.slo_p99_s
    interactive = result.tier_latencies_s("interactive")
    flex_ok = True
    if isinstance(setting, Controller):
        flex_ok = result.max_wait_s("flex") <= setting.settings.flex_budget_s + 1e-6
    p99 = statistics.quantiles(interactive, n=100, method="inclusive")[98] if len(interactive) > 1 else 0.0
    return p99 <= inp.slo_p99_s and flex_ok


def _serving(profile: EnergyProfile, inp: PlanInput, setting: Setting, label: str) -> dict[str, Any] | None:
    """The fewest GPUs that keep the p99 within the SLO under ``setting``, and what they cost (None: no
    count up to 4x the throughput bound does)."""
    mean_output = statistics.fmean(_lengths_sample(inp.output_tokens))
    size = setting.batch_size if isinstance(setting, BatcherRule) else profile.max_size
    floor = max(1, math.ceil(inp.rate_per_s * mean_output / profile.at(size).tokens_per_s - 1e-9))
    for gpus in range(floor, 4 * floor + 2):
        result = _simulate(profile, inp, setting, gpus)
        if _meets(result, inp, setting) and result.seconds > 0:
            power_w = result.joules / result.seconds
            joules_per_s = gpus * power_w
            kwh = joules_per_s * SECONDS_PER_MONTH / 3.6e6 * inp.pue
            concurrency = result.sequence_seconds / result.busy_s if result.busy_s else 1.0
            return {
                "setting": label,
                "sequences": setting.batch_size
                if isinstance(setting, BatcherRule)
                else round(concurrency, 1),
                "gpus": gpus,
                "gpu_mean_power_w": power_w,
                "joules_per_request": joules_per_s / inp.rate_per_s,
                "joules_per_1k_tokens": 1000 * joules_per_s / (inp.rate_per_s * mean_output),
                "p99_s": result.p99_s,
                "kwh_per_month": kwh,
                "cost_per_month": kwh * inp.price_per_kwh,
                "co2_kg_per_month": kwh * inp.carbon_g_per_kwh / 1000,
            }
    return None


def _lengths_sample(spec: str) -> list[int]:
    draw = parse_lengths(spec, "--output-tokens")
    rng = random.Random(0)
    return [draw(rng) for _ in range(10_000)]


def plan(profile: EnergyProfile, inp: PlanInput, shape: ModelShape) -> dict[str, Any]:
    """GPUs and energy for the baseline (vLLM direct; static: one request at a time) and for ecobatch
    (its controller; static: the batch size and window that spend the fewest joules within the SLO)."""
    if profile.kind == "continuous":
        baseline = _serving(profile, inp, SendAtOnce(), "vLLM direct (send at once)")
        best = _serving(profile, inp, Controller(BatchingSettings()), "ecobatch (default settings)")
    else:
        baseline = _serving(profile, inp, BatcherRule(0.0, 0.0, 1), "one request at a time")
        candidates = (
            _serving(profile, inp, BatcherRule(lo / 1000, hi / 1000, size), f"batch {size}, window {hi:g} ms")
            for size in _sizes(profile)
            for lo, hi in WINDOWS_MS
        )
        options = [o for o in candidates if o is not None]
        best = min(options, key=lambda o: o["joules_per_request"]) if options else None
    result: dict[str, Any] = {
        "modelled": True,
        "profile": {"name": profile.name, "kind": profile.kind, "source": profile.source, "gpu": profile.gpu},
        "requests_per_month": inp.rate_per_s * SECONDS_PER_MONTH,
        "baseline": baseline,
        "operating_point": best,
        "saving_vs_baseline": (
            1 - best["kwh_per_month"] / baseline["kwh_per_month"] if best and baseline else None
        ),
    }
    tokens = inp.prompt_tokens + statistics.fmean(_lengths_sample(inp.output_tokens))
    weights = weight_bytes(shape, profile.quantization)
    result["vram"] = [
        {
            "sequences": n,
            "guide_rule_of_thumb_gb": 7.0 + 0.7 * n,
            "exact_weights_gb": weights / 1e9,
            "exact_kv_cache_gb": kv_bytes(shape, tokens, n) / 1e9,
            "exact_total_gb": (weights + kv_bytes(shape, tokens, n)) / 1e9,
        }
        for n in sorted({1, 8, 32, 64, math.ceil(best["sequences"]) if best else 1})
    ]
    return result


def add_arguments(p: Any) -> None:
    p.add_argument("--profile", action="append", default=[], help="profile YAML (repeat to compare)")
    volume = p.add_mutually_exclusive_group(required=True)
    volume.add_argument("--rate", type=float, help="requests per second")
    volume.add_argument("--per-month", type=float, help="requests per month (30 days)")
    p.add_argument("--prompt-tokens", type=float, default=128.0, help="mean prompt tokens")
    p.add_argument(
        "--output-tokens", default="256", help="N, uniform:A-B, choice:A,B,… or lognormal:MEDIAN,SIGMA,MAX"
    )
    p.add_argument("--slo-p99-s", type=float, default=30.0, help="p99 end-to-end latency to meet")
    p.add_argument(
        "--flex-share",
        type=float,
        default=0.0,
        help="share of requests sent with service_tier=flex (continuous engines; default 0)",
    )
    energy = EnergySettings()  # the same defaults as serve's energy.* settings, one meaning each
    p.add_argument(
        "--price-per-kwh",
        type=float,
        default=energy.price_per_kwh,
        help=f"tariff (default {energy.price_per_kwh:g}, serve's energy.price_per_kwh: the seed table's)",
    )
    p.add_argument("--currency", default=energy.currency)
    p.add_argument(
        "--carbon-g-per-kwh",
        type=float,
        default=energy.carbon_g_per_kwh,
        help=f"grid intensity (default {energy.carbon_g_per_kwh:g}, serve's energy.carbon_g_per_kwh: the "
        "seed table's China grid; a world average is ~475)",
    )
    p.add_argument("--pue", type=float, default=1.2, help="data-centre power usage effectiveness")
    p.add_argument("--model-config", help="the model's config.json (default: Mistral-7B's shape)")
    p.add_argument("--json", help="also write the plan as JSON here")


def run_cli(args: Any) -> int:
    import json
    from pathlib import Path

    from ..config import DEFAULT_PROFILES
    from ..profile import load_profile

    parse_lengths(args.output_tokens, "--output-tokens")
    rate = args.rate if args.rate is not None else args.per_month / SECONDS_PER_MONTH
    if rate <= 0 or args.pue < 1:
        raise ValueError("need a volume > 0 and --pue >= 1")
    inp = PlanInput(
        rate_per_s=rate,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        slo_p99_s=args.slo_p99_s,
        price_per_kwh=args.price_per_kwh,
        carbon_g_per_kwh=args.carbon_g_per_kwh,
        pue=args.pue,
        flex_share=args.flex_share,
    )
    if not 0 <= args.flex_share <= 1:
        raise ValueError(f"--flex-share={args.flex_share} must be between 0 and 1")
    shape = ModelShape()
    if args.model_config:
        path = Path(args.model_config)
        shape = ModelShape.from_config(
            json.loads((path / "config.json" if path.is_dir() else path).read_text())
        )
    profiles = [load_profile(p) for p in args.profile] or [load_profile(DEFAULT_PROFILES["continuous"])]
    plans = [plan(p, inp, shape) for p in profiles]
    print(render(plans, inp, args.currency))
    if args.json:
        Path(args.json).write_text(json.dumps({"input": asdict(inp), "plans": plans}, indent=1))
        print(f"wrote {args.json}")
    return 0


def render(plans: list[dict[str, Any]], inp: PlanInput, currency: str) -> str:
    lines = [
        f"MODELLED from energy profiles (ecobatch tune's engine model): {inp.rate_per_s:.3g} "
        f"requests/s ({inp.rate_per_s * SECONDS_PER_MONTH:,.0f}/month), {inp.prompt_tokens:g} prompt tokens, "
        f"output tokens {inp.output_tokens}, flex share {inp.flex_share:g}, p99 SLO {inp.slo_p99_s:g} s, "
        f"PUE {inp.pue:g}, "
        f"{inp.carbon_g_per_kwh:g} gCO2/kWh, {inp.price_per_kwh:g} {currency}/kWh",
        "",
        f"{'profile':<40} {'serving':<28} {'GPUs':>4} {'J/req':>8} {'J/1k tok':>9} {'kWh/mo':>9} "
        f"{'cost/mo':>9} {'kgCO2/mo':>9}",
    ]
    for p in plans:
        name = f"{p['profile']['name']} ({p['profile']['source']})"
        rows = [s for s in (p["baseline"], p["operating_point"]) if s is not None]
        for s in rows:
            lines.append(
                f"{name:<40} {s['setting']:<28} {s['gpus']:>4} {s['joules_per_request']:>8.1f} "
                f"{s['joules_per_1k_tokens']:>9.1f} {s['kwh_per_month']:>9,.0f} {s['cost_per_month']:>9,.2f} "
                f"{s['co2_kg_per_month']:>9,.0f}"
            )
            name = ""
        if p["saving_vs_baseline"] is not None:
            lines.append(
                f"{'':<40} saves {100 * p['saving_vs_baseline']:.0f} % of the kWh of "
                f"{p['baseline']['setting']}"
            )
        elif p["operating_point"] is None:
            lines.append(f"{name:<40} no setting meets the SLO: loosen it or shorten the outputs")
        else:
            lines.append(f"{'':<40} the baseline misses the SLO: no saving to state")
    ranked = [p for p in plans if p["operating_point"] is not None]
    if len(plans) > 1 and ranked:
        best = min(ranked, key=lambda p: p["operating_point"]["joules_per_request"])
        lines += [
            "",
            f"fewest joules per request: {best['profile']['name']} "
            f"({best['operating_point']['joules_per_request']:.1f} J at its operating point)",
        ]
    lines += [
        "",
        "VRAM per batch (first profile's quantization):",
        f"{'sequences':>9} {'guide rule 7 + 0.7/req GB':>26} {'exact weights GB':>17} {'exact KV GB':>12} "
        f"{'exact total GB':>15}",
    ]
    for v in plans[0]["vram"]:
        lines.append(
            f"{v['sequences']:>9} {v['guide_rule_of_thumb_gb']:>26.1f} {v['exact_weights_gb']:>17.1f} "
            f"{v['exact_kv_cache_gb']:>12.2f} {v['exact_total_gb']:>15.1f}"
        )
    return "\n".join(lines)

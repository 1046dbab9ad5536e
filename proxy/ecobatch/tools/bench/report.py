"""A benchmark's numbers per target (throughput, latency, TTFT, inter-token latency, errors, energy),
the JSON that keeps them, and a PNG that shows them side by side."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .client import Outcome

__all__ = ["plot", "summarise", "table"]


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    if len(values) == 1:
        v = values[0]
        return {"p50": v, "p95": v, "p99": v, "mean": v}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p95": q[94], "p99": q[98], "mean": statistics.fmean(values)}


def summarise(
    label: str, url: str, outcomes: Sequence[Outcome], start_s: float, end_s: float, energy: dict[str, Any]
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    seconds = end_s - start_s
    completion = sum(o.completion_tokens for o in ok)
    summary: dict[str, Any] = {
        "label": label,
        "url": url,
        "requests": len(outcomes),
        "ok": len(ok),
        "errors_by_status": dict(Counter(str(o.status) for o in outcomes if o.status != 200)),
        "first_errors": sorted({o.error for o in outcomes if o.error})[:5],
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds if seconds > 0 else None,
        "prompt_tokens": sum(o.prompt_tokens for o in ok),
        "completion_tokens": completion,
        "output_tokens_per_s": completion / seconds if seconds > 0 else None,
        "latency_s": _quantiles([o.latency_s for o in ok]),
        "ttft_s": _quantiles([o.ttft_s for o in ok if o.ttft_s is not None]),
        "itl_s": _quantiles([gap for o in ok for gap in o.itl_s]),
        "by_tier": {
            tier: {
                "requests": sum(1 for o in outcomes if o.tier == tier),
                "ok": sum(1 for o in ok if o.tier == tier),
                "latency_s": _quantiles([o.latency_s for o in ok if o.tier == tier]),
                "ttft_s": _quantiles([o.ttft_s for o in ok if o.tier == tier and o.ttft_s is not None]),
                "max_latency_s": max((o.latency_s for o in ok if o.tier == tier), default=None),
            }
            for tier in sorted({o.tier for o in outcomes})
        },
        "energy": energy,
    }
    joules = energy.get("joules")
    window = energy.get("window_s") or seconds
    if joules is not None and ok:
        energy["joules_per_request"] = joules / len(ok)
        energy["joules_per_1k_tokens"] = 1000 * joules / completion if completion else None
        energy["mean_power_w"] = joules / window if window > 0 else None
    reported = energy.get("ecobatch")
    if reported and ok:
        reported["attributed_joules_per_request"] = reported["attributed_joules"] / len(ok)
        total = reported["attributed_joules"] + reported["idle_joules"] + reported["unattributed_joules"]
        reported["joules_per_request_with_idle"] = total / len(ok)
    return summary


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def table(summaries: Sequence[dict[str, Any]]) -> str:
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("requests ok / sent", lambda s: f"{s['ok']} / {s['requests']}"),
        ("errors", lambda s: ", ".join(f"{k}×{v}" for k, v in s["errors_by_status"].items()) or "none"),
        ("throughput req/s", lambda s: _fmt(s["requests_per_s"], digits=2)),
        ("output tok/s", lambda s: _fmt(s["output_tokens_per_s"], digits=1)),
        (
            "latency p50 / p95 / p99 s",
            lambda s: " / ".join(_fmt(s["latency_s"][k]) for k in ("p50", "p95", "p99")),
        ),
        ("TTFT p50 / p99 s", lambda s: " / ".join(_fmt(s["ttft_s"][k]) for k in ("p50", "p99"))),
        ("by tier: latency p50 / p99 s", _tiers),
        (
            "inter-token p50 / p99 ms",
            lambda s: " / ".join(_fmt(s["itl_s"][k], 1000, 1) for k in ("p50", "p99")),
        ),
        ("energy source", lambda s: s["energy"].get("source", "none")),
        ("J/request (idle included)", lambda s: _fmt(s["energy"].get("joules_per_request"), digits=2)),
        ("J/1k tokens", lambda s: _fmt(s["energy"].get("joules_per_1k_tokens"), digits=1)),
        ("mean power W", lambda s: _fmt(s["energy"].get("mean_power_w"), digits=1)),
        (
            "ecobatch: attributed J/request (its meter)",
            lambda s: _attributed(s["energy"].get("ecobatch") or {}),
        ),
    ]
    head = "| | " + " | ".join(s["label"] for s in summaries) + " |"
    lines = [head, "|---" * (len(summaries) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fn(s) for s in summaries) + " |" for name, fn in rows]
    return "\n".join(lines)


def _tiers(summary: dict[str, Any]) -> str:
    """Each tier's latency, where more than one tier was sent: "interactive 0.31 / 2.40; flex 17.2 / 31.0"."""
    tiers = summary.get("by_tier") or {}
    if len(tiers) < 2:
        return "—"
    return "; ".join(
        f"{t} " + " / ".join(_fmt(v["latency_s"][k], digits=2) for k in ("p50", "p99"))
        for t, v in tiers.items()
    )


def _attributed(reported: dict[str, Any]) -> str:
    """ecobatch's own J/request with the source it came from: "95.63 (model: MODELLED)"."""
    value = _fmt(reported.get("attributed_joules_per_request"), digits=2)
    sources = reported.get("sources") or []
    if value == "—" or not sources:
        return value
    label = ", ".join(sources) + (": MODELLED" if "model" in sources else "")
    return f"{value} ({label})"


def plot(summaries: Sequence[dict[str, Any]], outcomes: Sequence[Sequence[Outcome]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s, outs in zip(summaries, outcomes, strict=True):
        lat = sorted(o.latency_s for o in outs if o.status == 200)
        if lat:
            a.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=s["label"])
    a.set_xlabel("end-to-end latency, s")
    a.set_ylabel("fraction of requests")
    a.grid(True, alpha=0.3)
    a.legend(fontsize=8)
    per_request = [s["energy"].get("joules_per_request") for s in summaries]
    if any(v is not None for v in per_request):
        b.bar([s["label"] for s in summaries], [v or 0 for v in per_request])
        b.set_ylabel(f"J per request ({summaries[0]['energy'].get('source')})")
    else:
        b.bar([s["label"] for s in summaries], [s["requests_per_s"] or 0 for s in summaries])
        b.set_ylabel("served requests per second")
    b.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

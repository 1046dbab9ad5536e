"""Does a receipt say what the GPU drew? ecobatch's receipts against the GPU's own counter, in three tests
that can fail (run on the GPU host, with ecobatch in front of vLLM and NVML readable here).

A receipt is the energy above the GPU's idle power while the request was in flight, shared with the
requests beside it by the work each did. Each phase is measured on its own: the idle power over
``--idle-s`` of nothing just before it, then the phase's arrivals, then ``--tail-s`` after the last
answer; the counter (NVML's total energy, read here, not through ecobatch) over that window, less idle
power × the window, is the phase's energy above idle.

1. **alone**: each request class alone at a fixed rate: the receipts' mean against the counter's
   above-idle energy per request (goal: within ±5 %);
2. **mixed**: the classes together at two loads, streamed and not: the receipts' cost ratio of each
   class to the decode-heavy one against the same ratio measured alone (goal: within ±10 %); and at one
   operating point (``--closed-in-flight`` requests kept in flight, alone and mixed), where a class's
   cost alone is not confounded by the concurrency it happens to run at;
3. **added**: a steady load L (D and M), then L plus Δ requests (``--delta-class``, D by default: the
   largest energy per request, so the difference stands out of the phase-to-phase noise) on the same
   arrivals, in the order L, L+Δ, L+Δ, L: the receipts of the Δ requests against the counter's difference
   (goal: ±10 %). A receipt is a share of the energy of the steps a request rode in, and the difference
   is what Δ added (its marginal cost): on a GPU whose power is concave in concurrency a share rule
   cannot meet this goal, and the table says by how much it misses. Beside it: the ledger's own
   difference (all receipts of L+Δ less all of L), which is bookkeeping (receipts sum to the energy
   above idle) and no check of the split.

Also written: the counter's readings every 20 ms (``counter-trace.csv.gz``, on the records' clock),
ecobatch's idle, other-work and attributed counters over the whole run (the other-work share) and, per
alone phase, the counter's above-idle energy in the seconds after the last answer (the
power's tail). Classes: P prompt-heavy (1,770 prompt tokens, 16 out), M medium (512, 128), D
decode-heavy (64, 512); prompts are random words drawn per run, phase and stream (``--prompt-salt``), so
that no prompt is sent twice (runs before 2026-12-03's run 3 drew them per seed, and phases sharing a
seed sent the same prompts: vLLM's prefix cache served some of them).

    python benchmarks/energy_truth.py --proxy http://127.0.0.1:8080 --out benchmarks/results/h200-energy-truth
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gzip
import json
import math
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ecobatch.tools.bench.energy import receipts

CLASSES: dict[str, tuple[int, int]] = {"P": (1770, 16), "M": (512, 128), "D": (64, 512)}
DELTA = "Δ"  # the arrival stream of the requests added to a steady load (of class ``--delta-class``)
_letters, _rng = "abcdefghijklmnopqrstuvwxyz", random.Random(0)
#: the words ``ecobatch.testing.models.build_tokenizer`` trains its BPE on (the same recipe and seed)
_WORDS = ["".join(_rng.choice(_letters) for _ in range(_rng.randint(2, 9))) for _ in range(5000)]


@dataclass
class Record:
    phase: str
    cls: str
    stream: bool
    sent_s: float
    end_s: float = 0.0
    request_id: str = ""
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    receipt_joules: float | None = None
    receipt_base_joules: float | None = None
    receipt_marginal_joules: float | None = None  # what it added, by the profile's power curve (modelled)
    basis: str | None = None
    added: bool = False  # one of the Δ requests added to a steady load (test 3)


class Counter:
    """The GPUs' total-energy counter, summed, sampled every 20 ms in a thread (t, joules): NVML's, or
    (``dcgm=URL``, a rehearsal against modelled GPUs) a dcgm-exporter's."""

    def __init__(self, spec: str) -> None:
        self._dcgm_url = spec[len("dcgm=") :] if spec.startswith("dcgm=") else None
        if self._dcgm_url is None:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            n = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        self.trace: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def read_j(self) -> float:
        if self._dcgm_url is not None:
            import urllib.request

            with urllib.request.urlopen(self._dcgm_url, timeout=5) as r:
                text = r.read().decode()
            return (
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
                )
                / 1000.0
            )
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1000.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = (time.monotonic(), self.read_j())
            with self._lock:
                self.trace.append(sample)
            self._stop.wait(0.02)

    def at(self, t_s: float) -> float:
        """The counter at ``t_s`` (linear between the samples around it)."""
        with self._lock:
            trace = list(self.trace)
        lo = max((s for s in trace if s[0] <= t_s), default=trace[0])
        hi = min((s for s in trace if s[0] >= t_s), default=trace[-1])
        if hi[0] == lo[0]:
            return lo[1]
        return lo[1] + (hi[1] - lo[1]) * (t_s - lo[0]) / (hi[0] - lo[0])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


async def _send(
    session: aiohttp.ClientSession, args: argparse.Namespace, rec: Record, rng: random.Random
) -> None:
    prompt_len, out = CLASSES[rec.cls]
    prompt_len, out = max(1, int(prompt_len * args.scale)), max(1, int(out * args.scale))
    body: dict[str, Any] = {
        "model": args.model,
        # words of the test models' tokenizer (one token each with its 32,000-token vocabulary), a new
        # random string of them per request: no prompt shares a cached prefix with another
        "prompt": " ".join(rng.choice(_WORDS) for _ in range(prompt_len)),
        "max_tokens": out,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if rec.stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with session.post(f"{args.proxy}/v1/completions", json=body) as r:
        rec.status = r.status
        rec.request_id = r.headers.get("X-Ecobatch-Request-Id", "")
        if not rec.stream:
            data = await r.json()
            usage = data.get("usage") or {}
        else:
            usage = {}
            async for line in r.content:
                text = line.decode().strip()
                if text.startswith("data: ") and text != "data: [DONE]":
                    chunk = json.loads(text[6:])
                    usage = chunk.get("usage") or usage
        rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
        rec.completion_tokens = int(usage.get("completion_tokens", 0))
    rec.end_s = time.monotonic()


def arrivals(mix: dict[str, float], seconds: float, seed: int) -> list[tuple[float, str]]:
    """Poisson arrivals per class (``mix``: class -> requests per second), merged in time order."""
    out = []
    for k, (cls, rate) in enumerate(sorted(mix.items())):
        rng, t = random.Random(seed * 100 + k), 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= seconds:
                break
            out.append((t, cls))
    return sorted(out)


@dataclass
class Phase:
    name: str
    idle_w: float = 0.0
    window_s: float = 0.0
    joules: float = 0.0
    above_idle_j: float = 0.0
    records: list[Record] = field(default_factory=list)
    tail_j: dict[str, float] = field(default_factory=dict)
    ecobatch: dict[str, float] = field(default_factory=dict)


async def _ecobatch_totals(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        for name in (
            "ecobatch_energy_joules_total",
            "ecobatch_idle_energy_joules_total",
            "ecobatch_unattributed_energy_joules_total",
        ):
            if line.startswith(name + "{") or line.startswith(name + " "):
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


async def run_phase(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    counter: Counter,
    name: str,
    mix: dict[str, float] | None,
    *,
    stream: bool,
    seed: int,
    closed: list[str] | None = None,
) -> Phase:
    """One phase: ``mix`` (class -> requests/s, Poisson), or ``closed``: one worker per entry keeping a
    request in flight, cycling through the classes from the one it names, for ``--seconds``."""
    phase = Phase(name)
    await asyncio.sleep(args.settle_s)
    t_idle = time.monotonic()
    e_idle = counter.read_j()
    await asyncio.sleep(args.idle_s)
    phase.idle_w = (counter.read_j() - e_idle) / (time.monotonic() - t_idle)
    before = await _ecobatch_totals(session, args.proxy)
    rng = random.Random(f"{args.prompt_salt}:{name}")  # the closed loop's prompts (as rngs below)
    t0 = time.monotonic()
    e0 = counter.read_j()
    tasks = []
    if closed is not None:
        order = sorted(set(closed))

        async def worker(first: str) -> None:
            k = order.index(first)
            while time.monotonic() - t0 < args.seconds:
                rec = Record(name, order[k % len(order)], stream, time.monotonic())
                phase.records.append(rec)
                await _send(session, args, rec, rng)
                k += 1

        tasks = [asyncio.create_task(worker(first)) for first in closed]
    else:
        # prompts: a generator per arrival stream, seeded by the run, the phase and the stream, so that
        # no two phases (nor two runs on one vLLM) send the same prompt: vLLM's prefix cache would serve it
        rngs: dict[str, random.Random] = {}
        for at_s, cls in arrivals(mix or {}, args.seconds, seed):
            delay = t0 + at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Record(name, args.delta_class if cls == DELTA else cls, stream, time.monotonic())
            rec.added = cls == DELTA
            phase.records.append(rec)
            stream_rng = rngs.setdefault(cls, random.Random(f"{args.prompt_salt}:{name}:{cls}"))
            tasks.append(asyncio.create_task(_send(session, args, rec, stream_rng)))
    await asyncio.gather(*tasks)
    last_end = max(r.end_s for r in phase.records)
    await asyncio.sleep(args.tail_s)
    t1 = time.monotonic()
    phase.window_s = t1 - t0
    phase.joules = counter.read_j() - e0
    phase.above_idle_j = phase.joules - phase.idle_w * phase.window_s
    for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0)):
        if last_end + hi <= t1:
            e = counter.at(last_end + hi) - counter.at(last_end + lo)
            phase.tail_j[f"{lo}-{hi}s"] = round(e - phase.idle_w * (hi - lo), 2)
    await _receipts(args.proxy, phase.records)
    after = await _ecobatch_totals(session, args.proxy)
    phase.ecobatch = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    bad = [r for r in phase.records if r.status != 200]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} requests failed, e.g. status {bad[0].status}")
    print(f"{name}: {summary(phase)}", flush=True)
    _append(Path(args.out), phase)  # as it goes: a run cut short keeps its phases
    return phase


def _append(out: Path, phase: Phase) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "phases.jsonl").open("a") as f:
        f.write(json.dumps(asdict(phase)) + "\n")


async def _receipts(url: str, records: list[Record]) -> None:
    """Every record's settled receipt (``ecobatch bench``'s reader: pending ones asked again for up to
    60 s); a receipt not settled by then stops the run."""
    got = await receipts(url, [rec.request_id for rec in records], wait_s=60)
    for rec in records:
        body = got[rec.request_id]
        if body.get("status") != "settled":
            raise SystemExit(f"receipt {rec.request_id} not settled (waited up to 60 s): {body}")
        rec.receipt_joules = body["energy_joules"]
        rec.receipt_base_joules = body.get("base_energy_joules")
        rec.receipt_marginal_joules = body.get("marginal_energy_joules")
        rec.basis = body.get("basis")


def concurrency(phase: Phase) -> dict[str, float]:
    """Each class's mean requests in flight over the phase's window (Little's law on the records)."""
    return {
        c: round(sum(r.end_s - r.sent_s for r in phase.records if r.cls == c) / phase.window_s, 2)
        for c in CLASSES
        if any(r.cls == c for r in phase.records)
    }


def summary(phase: Phase) -> str:
    per = {c: [r.receipt_joules or 0.0 for r in phase.records if r.cls == c] for c in CLASSES}
    means = " ".join(f"{c} {statistics.fmean(v):.1f} J (n={len(v)})" for c, v in per.items() if v)
    ledger = sum(r.receipt_joules or 0.0 for r in phase.records)
    return (
        f"idle {phase.idle_w:.1f} W, window {phase.window_s:.1f} s, above idle {phase.above_idle_j:.0f} J, "
        f"receipts {ledger:.0f} J ({ledger / phase.above_idle_j:.3f}); {means}; tail {phase.tail_j}"
    )


def _mean(phase: Phase, cls: str) -> float:
    return statistics.fmean(r.receipt_joules or 0.0 for r in phase.records if r.cls == cls)


def _or_dash(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ci95(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (math.nan, math.nan)
    m, s = statistics.fmean(values), statistics.stdev(values)
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(values), 2.0)
    return (m - t * s / math.sqrt(len(values)), m + t * s / math.sqrt(len(values)))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    counter = Counter(args.counter)
    out: dict[str, Any] = {
        "command": "python benchmarks/energy_truth.py " + " ".join(args.argv),
        "prompt_salt": args.prompt_salt,
        "phases": [],
    }
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(f"{args.proxy}/v1/models") as r:
            args.model = (await r.json())["data"][0]["id"]
        start = await _ecobatch_totals(session, args.proxy)
        e_start, t_start = counter.read_j(), time.monotonic()
        phases: dict[str, Phase] = {}
        rate = args.rate
        # 1. each class alone
        for k, cls in enumerate(("P", "M", "D")):
            phases[f"alone-{cls}"] = await run_phase(
                session, args, counter, f"alone-{cls}", {cls: rate}, stream=False, seed=10 + k
            )
        # 2. mixed, two loads, streamed and not
        for load_name, per_class in (("moderate", args.mixed_rates[0]), ("high", args.mixed_rates[1])):
            for stream in (False, True):
                name = f"mixed-{load_name}-{'stream' if stream else 'plain'}"
                mix = dict.fromkeys(CLASSES, per_class)
                phases[name] = await run_phase(session, args, counter, name, mix, stream=stream, seed=20)
        # 2b. at one operating point: each class alone, then all three, with C requests kept in flight
        c = args.closed_in_flight
        for cls in ("P", "M", "D"):
            name = f"matched-alone-{cls}"
            phases[name] = await run_phase(
                session, args, counter, name, None, stream=False, seed=40, closed=[cls] * c
            )
        mixed_workers = [("P", "M", "D")[i % 3] for i in range(c)]
        phases["matched-mixed"] = await run_phase(
            session, args, counter, "matched-mixed", None, stream=False, seed=41, closed=mixed_workers
        )
        # 3. a steady load, then Δ added on the same arrivals: L, L+Δ, L+Δ, L
        base = {"D": rate / 2, "M": rate / 2}
        for k, with_delta in enumerate((False, True, True, False)):
            name = f"added-{k}-{'L+Δ' if with_delta else 'L'}"
            # Δ is a stream of its own ("Δ" sorts after the classes' letters, so L's arrivals are the same
            # in both phases)
            mix = base | ({DELTA: args.delta_rate} if with_delta else {})
            phases[name] = await run_phase(session, args, counter, name, mix, stream=False, seed=30)
        end = await _ecobatch_totals(session, args.proxy)
        run_j, run_s = counter.read_j() - e_start, time.monotonic() - t_start
    counter.close()
    out["trace"] = counter.trace
    out["phases"] = [
        {
            **{k: v for k, v in asdict(p).items() if k != "records"},
            "requests": len(p.records),
            "in_flight_by_class": concurrency(p),
        }
        for p in phases.values()
    ]
    out["records"] = [asdict(r) for p in phases.values() for r in p.records]
    # 1. alone
    alone = {}
    for cls in CLASSES:
        p = phases[f"alone-{cls}"]
        nvml = p.above_idle_j / len(p.records)
        ledger = _mean(p, cls)
        alone[cls] = {"nvml_j_per_request": nvml, "ledger_j_per_request": ledger, "ratio": ledger / nvml}
    out["alone"] = alone
    # 2. mixed: ratios to D against the alone NVML ratios
    mixed = {}
    for name, p in phases.items():
        if not name.startswith("mixed"):
            continue
        mixed[name] = {
            f"{cls}/D": {
                "ledger": _mean(p, cls) / _mean(p, "D"),
                "alone_nvml": alone[cls]["nvml_j_per_request"] / alone["D"]["nvml_j_per_request"],
            }
            for cls in ("P", "M")
        }
        for v in mixed[name].values():
            v["ratio"] = v["ledger"] / v["alone_nvml"]
    out["mixed"] = mixed
    # 2b. at one operating point (C in flight): the mixed phase's ledger ratios against the classes'
    # NVML ratios alone at the same C
    matched_alone = {
        cls: phases[f"matched-alone-{cls}"].above_idle_j / len(phases[f"matched-alone-{cls}"].records)
        for cls in CLASSES
    }
    mm = phases["matched-mixed"]
    out["matched"] = {
        "in_flight": args.closed_in_flight,
        "alone_nvml_j_per_request": matched_alone,
        "alone_ledger_j_per_request": {c: _mean(phases[f"matched-alone-{c}"], c) for c in CLASSES},
        "mixed_ledger_j_per_request": {c: _mean(mm, c) for c in CLASSES},
        "ratios": {
            f"{cls}/D": {
                "ledger_mixed": _mean(mm, cls) / _mean(mm, "D"),
                "alone_nvml": matched_alone[cls] / matched_alone["D"],
            }
            for cls in ("P", "M")
        },
    }
    for v in out["matched"]["ratios"].values():
        v["ratio"] = v["ledger_mixed"] / v["alone_nvml"]
    # 3. added: NVML difference (each phase's own idle subtracted) against Δ's receipts, per pair
    pairs = [("added-0-L", "added-1-L+Δ"), ("added-3-L", "added-2-L+Δ")]
    added = []
    for lo, hi in pairs:
        diff = phases[hi].above_idle_j - phases[lo].above_idle_j
        n_added = sum(r.added for r in phases[hi].records)
        ledger = sum(r.receipt_joules or 0.0 for r in phases[hi].records if r.added)
        marginals = [r.receipt_marginal_joules for r in phases[hi].records if r.added]
        marginal = None if any(m is None for m in marginals) else sum(m or 0.0 for m in marginals)
        ledger_difference = sum(r.receipt_joules or 0.0 for r in phases[hi].records) - sum(
            r.receipt_joules or 0.0 for r in phases[lo].records
        )
        added.append(
            {
                "pair": [lo, hi],
                "added_requests": n_added,
                "nvml_difference_j": diff,
                "nvml_difference_j_per_added_request": diff / n_added if n_added else None,
                "ledger_delta_j": ledger,
                "ratio": ledger / diff,
                "ledger_difference_j": ledger_difference,
                # what the receipts say Δ added (the profile's power curve; None: not reported)
                "marginal_j": marginal,
                "marginal_ratio": None if marginal is None else marginal / diff,
            }
        )
    out["added"] = added
    out["added_ratio_ci95"] = _ci95([a["ratio"] for a in added])
    ratios = [a["marginal_ratio"] for a in added]
    known = [r for r in ratios if r is not None]
    out["added_marginal_ratio_ci95"] = _ci95(known) if len(known) == len(ratios) else None
    delta = {k: end.get(k, 0.0) - start.get(k, 0.0) for k in end}
    metered = sum(delta.values())
    out["whole_run"] = {
        "nvml_j": run_j,
        "seconds": run_s,
        "ecobatch_metered_j": metered,
        "ecobatch_idle_j": delta.get("ecobatch_idle_energy_joules_total", 0.0),
        "ecobatch_other_work_j": delta.get("ecobatch_unattributed_energy_joules_total", 0.0),
        "ecobatch_attributed_j": delta.get("ecobatch_energy_joules_total", 0.0),
        "other_work_share": delta.get("ecobatch_unattributed_energy_joules_total", 0.0) / metered
        if metered
        else None,
    }
    return out


class CounterTrace:
    """A run's ``counter-trace.csv.gz`` as ``write`` leaves it: the counter's readings on the records'
    clock, read back (``idle_replay.py``, ``ledger_replay.py``)."""

    def __init__(self, where: Path) -> None:
        with gzip.open(where / "counter-trace.csv.gz", "rt") as f:
            rows = [line.split(",") for line in f.read().splitlines()[1:]]
        self.times_s = [float(t) for t, _ in rows]
        self._joules = [float(j) for _, j in rows]

    def at(self, t_s: float) -> float:
        """The last reading at or before ``t_s`` (the first before the trace): what a reader saw then."""
        return self._joules[max(0, bisect.bisect_right(self.times_s, t_s) - 1)]


def read_records(where: Path) -> list[dict[str, Any]]:
    """A run's ``records.jsonl``: one request a line, as ``write`` leaves them."""
    with (where / "records.jsonl").open() as f:
        return [json.loads(line) for line in f]


def write(out: dict[str, Any], where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    records = out.pop("records")
    # the counter every 20 ms on the records' clock (their sent_s, end_s): where the energy went, in time
    with gzip.open(where / "counter-trace.csv.gz", "wt") as f:
        f.write("t_s,joules\n")
        f.writelines(f"{t:.4f},{j:.3f}\n" for t, j in out.pop("trace"))
    with (where / "records.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (where / "energy-truth.json").write_text(json.dumps(out, indent=1))
    lines = [
        "| class | NVML above idle, J/request | ledger, J/request | ledger / NVML |",
        "|---|---|---|---|",
    ]
    for cls, a in out["alone"].items():
        lines.append(
            f"| {cls} | {a['nvml_j_per_request']:.1f} | {a['ledger_j_per_request']:.1f} | {a['ratio']:.3f} |"
        )
    lines += [
        "",
        "| mixed phase | P/D ledger | P/D alone | ratio | M/D ledger | M/D alone | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in out["mixed"].items():
        p, mm = m["P/D"], m["M/D"]
        lines.append(
            f"| {name} | {p['ledger']:.3f} | {p['alone_nvml']:.3f} | {p['ratio']:.3f} | "
            f"{mm['ledger']:.3f} | {mm['alone_nvml']:.3f} | {mm['ratio']:.3f} |"
        )
    m = out["matched"]
    lines += [
        "",
        f"at {m['in_flight']} in flight: | class | NVML alone J/req | ledger alone | ledger mixed |",
        "|---|---|---|---|",
    ]
    for cls in CLASSES:
        lines.append(
            f"| {cls} | {m['alone_nvml_j_per_request'][cls]:.1f} "
            f"| {m['alone_ledger_j_per_request'][cls]:.1f} | {m['mixed_ledger_j_per_request'][cls]:.1f} |"
        )
    for key, v in m["ratios"].items():
        lines.append(
            f"| {key} ratio | alone NVML {v['alone_nvml']:.3f} | mixed ledger {v['ledger_mixed']:.3f} "
            f"| {v['ratio']:.3f} |"
        )
    lines += [
        "",
        "| added pair | Δ requests | NVML difference, J | per Δ request | Δ's receipts, J | ratio "
        "| Δ's marginal (modelled), J | ratio | all receipts' difference, J (bookkeeping) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in out["added"]:
        per = a["nvml_difference_j_per_added_request"]
        lines.append(
            f"| {' → '.join(a['pair'])} | {a['added_requests']} | {a['nvml_difference_j']:.0f} "
            f"| {'—' if per is None else f'{per:.1f}'} | {a['ledger_delta_j']:.0f} | {a['ratio']:.3f} "
            f"| {_or_dash(a['marginal_j'], '.0f')} | {_or_dash(a['marginal_ratio'], '.3f')} "
            f"| {a['ledger_difference_j']:.0f} |"
        )
    w = out["whole_run"]
    lines += [
        "",
        f"whole run: NVML {w['nvml_j']:.0f} J over {w['seconds']:.0f} s; "
        f"ecobatch metered {w['ecobatch_metered_j']:.0f} J, "
        f"other work {w['ecobatch_other_work_j']:.0f} J ({100 * (w['other_work_share'] or 0):.2f} %)",
    ]
    (where / "energy-truth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="http://127.0.0.1:8080")
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s of a class alone")
    parser.add_argument(
        "--mixed-rates", type=float, nargs=2, default=(1.0, 4.0), help="per class: moderate, high"
    )
    parser.add_argument(
        "--delta-rate", type=float, default=2.0, help="requests/s added to the steady load (test 3)"
    )
    parser.add_argument(
        "--delta-class", choices=sorted(CLASSES), default="D", help="the added requests' class (test 3)"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="arrivals per phase")
    parser.add_argument("--closed-in-flight", type=int, default=12, help="requests kept in flight (2b)")
    parser.add_argument("--idle-s", type=float, default=4.0)
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait before measuring idle")
    parser.add_argument("--tail-s", type=float, default=2.0, help="kept in the window after the last answer")
    parser.add_argument("--counter", default="nvml", help="nvml, or dcgm=URL (a rehearsal on modelled GPUs)")
    parser.add_argument("--scale", type=float, default=1.0, help="class lengths × this (a rehearsal: 0.1)")
    parser.add_argument(
        "--prompt-salt",
        default=str(time.time_ns()),
        help="seeds the prompts' words with the phase's name (default: the start time, new every run)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    write(asyncio.run(main(args)), Path(args.out))

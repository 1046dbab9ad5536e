"""Each request's energy receipt, for a client to look up by request id after its response.

A response is never held for the meter: it carries a **provisional** figure (the profile's J/token at
the request's mean concurrency × its generated tokens: a model, labelled as one). The receipt turns
``settled`` once the ledger has split the counter's intervals up to the request's end; it then holds
the measured joules (or the modelled ones, with ``source="model"``). The newest ``capacity`` receipts
are kept, each a small slotted record (a few hundred bytes), so the store's memory is bounded. One
store serves every replica; only the replicas' energy accounts (``account.py``) write to it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .ledger import SettledRequest

__all__ = ["Receipts"]


@dataclass(slots=True)
class _Receipt:
    source: str
    provisional_joules: float | None = None
    settled: bool = False
    joules: float = 0.0
    complete: bool = True
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0
    base_joules: float = 0.0
    basis: str = ""
    uncertainty_joules: float | None = None
    marginal_joules: float | None = None


class Receipts:
    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"{capacity=} must be >= 1")
        self._capacity = capacity
        self._items: OrderedDict[str, _Receipt] = OrderedDict()

    def _entry(self, request_id: str, source: str) -> _Receipt:
        entry = self._items.get(request_id)
        if entry is None:
            entry = self._items[request_id] = _Receipt(source)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return entry

    def pending(self, request_id: str, *, provisional_joules: float, source: str) -> None:
        """The request has ended; its joules are not settled yet."""
        self._entry(request_id, source).provisional_joules = provisional_joules

    def settle(self, settled: SettledRequest) -> None:
        entry = self._entry(settled.request_id, settled.source)
        entry.settled, entry.joules, entry.complete = True, settled.joules, settled.complete
        entry.prompt_tokens = settled.usage.prompt_tokens
        entry.completion_tokens = settled.usage.completion_tokens
        entry.duration_s = settled.end_s - settled.start_s
        entry.base_joules, entry.basis = settled.base_joules, settled.basis
        entry.uncertainty_joules = settled.uncertainty_joules
        entry.marginal_joules = settled.marginal_joules

    def get(self, request_id: str) -> dict[str, Any] | None:
        entry = self._items.get(request_id)
        if entry is None:
            return None
        out: dict[str, Any] = {"id": request_id, "source": entry.source}
        if entry.provisional_joules is not None:
            out["provisional_joules"] = entry.provisional_joules
            out["provisional_basis"] = "profile (modelled)"
        if not entry.settled:
            out["status"] = "pending"
            return out
        out.update(
            status="settled",
            # above the GPU's idle power while it was in flight, shared by work with those beside it
            energy_joules=entry.joules,
            # idle power while it was in flight, its share (a full-cost view adds it; never in the above)
            base_energy_joules=entry.base_joules,
            basis=entry.basis,
            # ± what the counter's timing cannot place across its start and end (null: not known); the
            # split among requests in flight together is a model, not in it (basis says what it rests on)
            energy_uncertainty_joules=entry.uncertainty_joules,
            # False: the counter was unreadable for part of the request's life (an underestimate)
            complete=entry.complete,
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            duration_s=entry.duration_s,
        )
        if entry.marginal_joules is not None:
            # what it added to the GPU's energy beyond what ran anyway: the profile's power curve over the
            # sequences in flight beside it (energy/marginal.py), a model; not a share, not in the above
            out["marginal_energy_joules"] = entry.marginal_joules
            out["marginal_basis"] = "profile power curve and prefill point (modelled)"
        return out

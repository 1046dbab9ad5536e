"""Each request's energy receipt, for a client to look up by request id after its response.

A response is never held for the meter: it carries a **provisional** figure (the profile's J/token at
the request's mean concurrency × its generated tokens: a model, labelled as one). The receipt turns
``settled`` once the ledger has split the counter's intervals up to the request's end; it then holds
the measured joules (or the modelled ones, with ``source="model"``). The newest ``capacity`` receipts
are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .ledger import SettledRequest

__all__ = ["Receipts"]


class Receipts:
    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"{capacity=} must be >= 1")
        self._capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def _put(self, request_id: str, fields: dict[str, Any]) -> None:
        entry = self._items.setdefault(request_id, {"id": request_id})
        entry.update(fields)
        self._items.move_to_end(request_id)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def pending(self, request_id: str, *, provisional_joules: float, source: str) -> None:
        """The request has ended; its joules are not settled yet."""
        if self._items.get(request_id, {}).get("status") == "settled":
            self._put(request_id, {"provisional_joules": provisional_joules})
            return
        self._put(
            request_id,
            {
                "status": "pending",
                "provisional_joules": provisional_joules,
                "provisional_basis": "profile (modelled)",
                "source": source,
            },
        )

    def settle(self, settled: SettledRequest) -> None:
        self._put(
            settled.request_id,
            {
                "status": "settled",
                "energy_joules": settled.joules,
                "source": settled.source,
                # False: the counter was unreadable for part of the request's life (an underestimate)
                "complete": settled.complete,
                "prompt_tokens": settled.usage.prompt_tokens,
                "completion_tokens": settled.usage.completion_tokens,
                "duration_s": settled.end_s - settled.start_s,
            },
        )

    def get(self, request_id: str) -> dict[str, Any] | None:
        entry = self._items.get(request_id)
        return dict(entry) if entry is not None else None

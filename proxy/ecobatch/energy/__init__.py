"""Energy: where the joules come from and whom they belong to.

* ``gpu``: NVIDIA GPUs through NVML, with a scripted fake (Zeus' pattern: code above never asks "is
  there a GPU?").
* ``counters``: cumulative per-GPU energy readers and reset-safe deltas; ``NvmlCounters`` (this host).
* ``dcgm``: ``DcgmCounters``, dcgm-exporter scraped where the GPU is (a remote vLLM).
* ``model``: the profile's modelled joules (``source="model"``), where no counter can be read.
* ``meter``: the background sampler that turns a counter into intervals.
* ``attribution``: the rule that splits one interval among the requests in flight by the tokens they
  processed, with idle and other clients' work in their own buckets (a pure function).
* ``ledger``: the requests' token timelines and the intervals, and when each can be split and settled.
* ``receipts``: each request's settled joules, for a client to look up by id.
* ``account``: a replica's energy account, its meter and ledger wired at construction: the one writer
  of its requests' provisional figures, estimates and receipts, and of the energy metrics.
* ``choose``: which source measures the engine, and why.
"""

from .attribution import IntervalSplit
from .ledger import Ledger, SettledRequest, Span
from .meter import Meter

__all__ = ["IntervalSplit", "Ledger", "Meter", "SettledRequest", "Span"]

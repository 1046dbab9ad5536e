"""Reading other programs' Prometheus exposition text (vLLM's /metrics, dcgm-exporter's).

Those pages hold many series (vLLM's histograms, dcgm's dozens of fields per GPU) and ecobatch reads
them often, so only the lines of the wanted metrics (with their ``# HELP`` / ``# TYPE``) are handed to
prometheus-client's parser. A counter declared without ``_total`` comes back from the parser with it;
``samples`` gives it back under the declared name.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["samples"]


def samples(text: str, names: tuple[str, ...]) -> Iterator[tuple[str, Sample]]:
    """(metric name, sample) for every sample of ``names`` in ``text``."""
    kept = [line for line in text.splitlines() if _strip_comment(line).startswith(names)]
    for family in text_string_to_metric_families("\n".join(kept) + "\n"):
        for sample in family.samples:
            name = sample.name.removesuffix("_total") if family.type == "counter" else sample.name
            if name in names or sample.name in names:
                yield (sample.name if sample.name in names else name), sample


def _strip_comment(line: str) -> str:
    return line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line

"""Read engine headroom from a vLLM server's Prometheus text.

``nvmlDeviceGetMemoryInfo`` is misleading under vLLM (it pre-reserves most of the VRAM), so headroom
comes from vLLM's own gauges: ``vllm:kv_cache_usage_perc`` (a 0–1 fraction), the KV capacity in tokens
(``vllm:cache_config_info``'s ``num_gpu_blocks`` × ``block_size``), and ``vllm:num_requests_running``
/ ``vllm:num_requests_waiting``. Series are summed over engines.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ..domain import Headroom

__all__ = ["headroom_from_metrics"]


def headroom_from_metrics(text: str) -> Headroom:
    usage: list[float] = []
    capacity = 0
    running = waiting = 0
    seen_running = seen_waiting = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name == "vllm:kv_cache_usage_perc":
                usage.append(sample.value)
            elif name == "vllm:num_requests_running":
                running += int(sample.value)
                seen_running = True
            elif name == "vllm:num_requests_waiting":
                waiting += int(sample.value)
                seen_waiting = True
            elif name == "vllm:cache_config_info":
                blocks, block_size = sample.labels.get("num_gpu_blocks"), sample.labels.get("block_size")
                if blocks and block_size and blocks.isdigit() and block_size.isdigit():
                    capacity += int(blocks) * int(block_size)
    free: int | None = None
    if usage and capacity:
        used_fraction = min(1.0, max(0.0, sum(usage) / len(usage)))
        free = int(capacity * (1.0 - used_fraction))
    return Headroom(
        kv_free_tokens=free,
        kv_capacity_tokens=capacity or None,
        running=running if seen_running else None,
        waiting=waiting if seen_waiting else None,
    )

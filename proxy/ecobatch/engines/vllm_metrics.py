"""Read engine headroom from a vLLM server's Prometheus text.

``nvmlDeviceGetMemoryInfo`` is misleading under vLLM (it pre-reserves most of the VRAM), so headroom
comes from vLLM's own gauges: ``vllm:kv_cache_usage_perc`` (a 0–1 fraction), the KV capacity in tokens
(``vllm:cache_config_info``'s ``num_gpu_blocks`` × ``block_size``), and ``vllm:num_requests_running``
/ ``vllm:num_requests_waiting``, and the token counters (``vllm:prompt_tokens_total`` +
``vllm:generation_tokens_total``: whether the engine stepped between two readings). Series are summed
over engines.
"""

from __future__ import annotations

from ..domain import Headroom
from ..exposition import samples

__all__ = ["headroom_from_metrics"]


_NAMES = (
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:cache_config_info",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)


def headroom_from_metrics(text: str) -> Headroom:
    usage: list[float] = []
    capacity = 0
    running = waiting = 0
    seen_running = seen_waiting = False
    tokens: float | None = None
    for name, sample in samples(text, _NAMES):
        if name == "vllm:kv_cache_usage_perc":
            usage.append(sample.value)
        elif name == "vllm:num_requests_running":
            running += int(sample.value)
            seen_running = True
        elif name == "vllm:num_requests_waiting":
            waiting += int(sample.value)
            seen_waiting = True
        elif name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
            tokens = (tokens or 0.0) + sample.value
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
        engine_tokens=tokens,
    )

from __future__ import annotations

from ecobatch.engines.vllm_metrics import headroom_from_metrics

SAMPLE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0
"""


def test_headroom_is_free_kv_tokens_from_usage_fraction_and_capacity() -> None:
    h = headroom_from_metrics(SAMPLE)
    assert h.kv_capacity_tokens == 16_000
    assert h.kv_free_tokens == 12_000
    assert (h.running, h.waiting) == (3, 2)


def test_missing_series_leave_headroom_unknown() -> None:
    h = headroom_from_metrics("# nothing here\n")
    assert h.kv_free_tokens is None and h.running is None and h.waiting is None

"""vLLM's in-process async engine (``AsyncLLM``) as the backend: one process, no HTTP hop.

Each sequence of a batch is submitted to the engine at once (continuous batching does the rest); text
comes back as deltas and is formatted as OpenAI responses or stream chunks by ``engine_output``.
Usage is the engine's own count (prompt token ids, generated token ids). Headroom comes from a vLLM
stat logger that receives the scheduler's stats (KV usage fraction, running and waiting requests).
Chat prompts are rendered with the model's own chat template (transformers ``AutoTokenizer``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from ..config import BackendSettings
from ..errors import BackendFailed, BadRequest
from ..openai_api import ENGINE_UNSUPPORTED, GenerationRequest, reject_fields
from ..policy import Headroom
from .base import BatchItem, GenerationResult
from .engine_output import RequestOutput, encode_prompts

__all__ = ["VllmAsyncBackend"]

log = logging.getLogger(__name__)


class _HeadroomSink:
    def __init__(self) -> None:
        self.headroom = Headroom()


def _logger_factory(sink: _HeadroomSink) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class HeadroomLogger(StatLoggerBase):  # type: ignore[misc]
        """Turns the scheduler's stats into ecobatch headroom."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._cache = vllm_config.cache_config

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            blocks, block_size = self._cache.num_gpu_blocks, self._cache.block_size
            capacity = blocks * block_size if blocks and block_size else None
            free = None if capacity is None else int(capacity * (1.0 - scheduler_stats.kv_cache_usage))
            sink.headroom = Headroom(
                kv_free_tokens=free,
                kv_capacity_tokens=capacity,
                running=scheduler_stats.num_running_reqs,
                waiting=scheduler_stats.num_waiting_reqs,
            )

        def log_engine_initialized(self) -> None:
            return None

    return HeadroomLogger


class VllmAsyncBackend:
    name = "vllm-async"
    continuous = True

    def __init__(self, settings: BackendSettings) -> None:
        assert settings.model is not None
        self._settings = settings
        self._model_path = settings.model
        self._served = settings.served_model_name or settings.model
        self._sink = _HeadroomSink()
        self._engine: Any = None
        self._tokenizer: Any = None

    @property
    def model(self) -> str:
        return self._served

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self._model_path, **self._settings.engine_args)
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[_logger_factory(self._sink)])
        self._tokenizer = AutoTokenizer.from_pretrained(self._model_path)

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def headroom(self) -> Headroom:
        return self._sink.headroom

    def _sampling(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop) or None,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )

    def _prompts(self, request: GenerationRequest) -> list[Any]:
        """Token-id prompts, checked against the context length as vLLM's OpenAI server does."""
        token_lists = encode_prompts(self._tokenizer, request)
        limit = self._engine.model_config.max_model_len
        field = "max_tokens" if request.kind == "completion" else "max_completion_tokens"
        for ids in token_lists:
            wanted = len(ids) + (request.max_tokens or 0)
            if len(ids) >= limit or wanted > limit:
                raise BadRequest(
                    f"{field}={request.max_tokens} with a {len(ids)}-token prompt exceeds the model's "
                    f"max_model_len={limit}; request fewer tokens",
                    param=field if len(ids) < limit else "prompt",
                )
        return [{"prompt_token_ids": ids} for ids in token_lists]

    async def generate(self, batch: Sequence[BatchItem]) -> list[GenerationResult | BaseException]:
        return list(await asyncio.gather(*(self._one(item) for item in batch)))

    async def _one(self, item: BatchItem) -> GenerationResult | BaseException:
        request = item.request
        try:
            reject_fields(request, ENGINE_UNSUPPORTED, self.name)
            params = self._sampling(request)
            prompts = self._prompts(request)
        except (BadRequest, ValueError, TypeError) as exc:
            return exc if isinstance(exc, BadRequest) else BadRequest(str(exc))
        output = RequestOutput(item)
        try:
            await asyncio.gather(
                *(self._sequence(output, i, prompt, params) for i, prompt in enumerate(prompts))
            )
        except ValueError as exc:  # vLLM validates inputs (e.g. prompt longer than max_model_len)
            return BadRequest(f"engine rejected the request: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return BackendFailed(f"vLLM engine error: {exc!r}")
        return output.result()

    async def _sequence(self, output: RequestOutput, index: int, prompt: Any, params: Any) -> None:
        request_id = f"{output.item.request.id}-{index}"
        async for out in self._engine.generate(prompt, params, request_id):
            if out.prompt_token_ids is not None:
                output.prompt_tokens[index] = len(out.prompt_token_ids)
            completion = out.outputs[0]
            output.completion_tokens[index] += len(completion.token_ids)
            output.add(index, completion.text, completion.finish_reason if out.finished else None)
            if output.item.cancelled():
                break  # closing the generator aborts the request in the engine

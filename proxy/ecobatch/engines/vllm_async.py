"""vLLM's in-process async engine (``AsyncLLM``) as a continuous engine: one process, no HTTP hop.

``prepare`` renders chat prompts with the model's own chat template and tokenizes them in a worker
thread (never on the event loop), then checks prompt + ``max_tokens`` against ``max_model_len`` as
vLLM's OpenAI server does. ``generate`` submits the request's sequences to the engine at once
(continuous batching does the rest) and yields vLLM's text deltas as ``EngineOutput``s with their token
counts (the energy ledger's clock), the engine's own usage last; the HTTP layer renders them. Outputs
are pulled: one the consumer has not asked for yet waits, merged, in vLLM's own per-request collector.
Closing the generator aborts its sequences in the engine (``AsyncLLM.abort``). Headroom comes from a
vLLM stat logger that receives the scheduler's stats (KV usage fraction, running and waiting requests);
vLLM's own ``vllm:*`` metrics are served on ecobatch's /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import msgspec
from prometheus_client import REGISTRY, CollectorRegistry

from ..config import BackendSettings
from ..domain import EngineOutput, GenerationRequest, Headroom, TextDelta, Usage
from ..errors import BackendFailed, BadRequest
from ..fields import BASIC_FIELDS, SAMPLING_FIELDS, check_fields
from .base import UP, EngineHealth, EngineShape, Progress
from .engine_output import encode_prompts
from .limits import fit_to_context
from .merge import merge

__all__ = ["VllmAsyncBackend"]

log = logging.getLogger(__name__)


SUPPORTED = BASIC_FIELDS | SAMPLING_FIELDS | {"priority"}


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
                read_at_s=time.monotonic(),  # the engine's step just ended; its stats are from it
            )

        def log_engine_initialized(self) -> None:
            return None

    return HeadroomLogger


class VllmAsyncBackend:
    name = "vllm-async"
    shape: ClassVar[EngineShape] = "continuous"
    metrics_registry: CollectorRegistry | None = None

    def __init__(self, settings: BackendSettings) -> None:
        assert settings.model is not None
        self._settings = settings
        self._model_path = settings.model
        self._served = settings.served_model_name or settings.model
        self._sink = _HeadroomSink()
        self._engine: Any = None
        self._tokenizer: Any = None
        self._tokenizer_worker = ThreadPoolExecutor(1, thread_name_prefix="vllm-async-tokenizer")

    @property
    def model(self) -> str:
        return self._served

    async def start(self, progress: Progress) -> None:
        progress(f"starting vLLM's engine on {self._model_path}")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self._model_path, **self._settings.engine_args)
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[_logger_factory(self._sink)])
        self.metrics_registry = REGISTRY  # vLLM's own stat logger registers its vllm:* series there
        self._tokenizer = await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_worker, AutoTokenizer.from_pretrained, self._model_path
        )

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        await asyncio.to_thread(self._tokenizer_worker.shutdown, True)

    def health(self) -> EngineHealth:
        return UP

    def headroom(self) -> Headroom:
        return self._sink.headroom

    @property
    def context_tokens(self) -> int:
        return int(self._engine.model_config.max_model_len)

    def _sampling(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extras = {name: request.body[name] for name in SAMPLING_FIELDS if request.body.get(name) is not None}
        if "logit_bias" in extras:  # OpenAI sends token ids as JSON object keys (strings)
            extras["logit_bias"] = {int(k): float(v) for k, v in extras["logit_bias"].items()}
        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop) or None,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            **extras,
        )

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        check_fields(request, SUPPORTED, self.name)
        prompts = await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_worker, encode_prompts, self._tokenizer, request
        )
        limit = self.context_tokens
        fitted = fit_to_context(request, [len(p) for p in prompts], limit, default_max_tokens=limit)
        try:
            self._sampling(fitted)
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadRequest(f"the engine refuses these sampling parameters: {exc}") from None
        return msgspec.structs.replace(fitted, engine_input=prompts)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineOutput, None]:
        params = self._sampling(request)
        prompts: list[list[int]] = request.engine_input
        prompt_tokens = [len(ids) for ids in prompts]
        completion_tokens = 0
        sequences = [self._sequence(request, i, ids, params, prompt_tokens) for i, ids in enumerate(prompts)]
        # several prompts: their outputs as each comes; one failing closes (and so aborts) its siblings
        outputs = sequences[0] if len(sequences) == 1 else merge(sequences)
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    completion_tokens += output.new_tokens
                    yield output
        except ValueError as exc:  # vLLM validates inputs too
            raise BadRequest(f"engine rejected the request: {exc}") from None
        except BadRequest:
            raise
        except Exception as exc:
            raise BackendFailed(f"vLLM engine error: {exc!r}") from None
        yield EngineOutput(usage=Usage(sum(prompt_tokens), completion_tokens))

    async def _sequence(
        self,
        request: GenerationRequest,
        index: int,
        ids: list[int],
        params: Any,
        prompt_tokens: list[int],
    ) -> AsyncGenerator[EngineOutput, None]:
        """One prompt's outputs from vLLM (its request id: ecobatch's, then the index); closed before it
        finishes, it is aborted in the engine."""
        request_id = f"{request.id}-{index}"
        finished = False
        try:
            priority = int(request.body.get("priority") or 0)  # the tier (engine_priority)
            generation = self._engine.generate(
                {"prompt_token_ids": ids}, params, request_id, priority=priority
            )
            async with contextlib.aclosing(generation) as stream:
                async for out in stream:
                    if out.prompt_token_ids is not None:
                        prompt_tokens[index] = len(out.prompt_token_ids)  # the engine's own count
                    completion = out.outputs[0]
                    finished = out.finished
                    reason = completion.finish_reason if finished else None
                    yield EngineOutput(
                        (TextDelta(index, completion.text, reason),), len(completion.token_ids)
                    )
        finally:
            if not finished and self._engine is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._engine.abort(request_id))

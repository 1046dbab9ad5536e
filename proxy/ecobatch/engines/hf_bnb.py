"""transformers (+ bitsandbytes LLM.int8) with static batches: what the seed called manual batching.

The GPU batch is exactly what the batcher sends, so the window and batch size set energy per request
directly. Loading is the real path: ``AutoModelForCausalLM.from_pretrained`` with
``BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)`` for ``dtype: int8`` (pure INT8, the
seed's recipe), or plain bf16/fp16/fp32. Settings come from ``backend.engine_args``::

    engine_args: {dtype: int8, device: cuda, cudnn_sdpa: false}

Generation is our own decode loop (``StaticBatchGenerator``), not ``model.generate``: prompts are left
padded; every request keeps its own ``max_tokens``, ``stop``, ``temperature``, ``top_p`` and ``seed``;
a sequence that has finished stops counting generated tokens (the GPU still computes its padded row,
as static batching does) and the batch ends when every sequence has finished. Usage is counted from
token ids. The loop runs in one dedicated worker thread, so two batches never share the model; text
deltas and token counts reach the event loop thread-safely. A batch that times out or whose caller is
cancelled sets a stop flag that the loop checks every step, and keeps the GPU slot until the worker has
really stopped. Tokenization and chat templates run in their own worker thread, before queuing
(``prepare``), where each request is checked against the model's context; the batcher only groups
requests whose longest prompt plus largest ``max_tokens`` fit it (``batch_fits``).

cuDNN's SDPA builds a plan on first sight of each KV length, which made first runs slower on the H200
(``benchmarks/results/README.md``); it is disabled by default (``cudnn_sdpa: false``) so every run is
warm.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
from prometheus_client import CollectorRegistry

from ..config import BackendSettings, BatchingSettings
from ..domain import GenerationRequest, GenerationResult, Headroom
from ..errors import BadRequest, ConfigError
from ..fields import BASIC_FIELDS, check_fields
from .base import UP, EngineHealth, EngineShape, Job, Progress
from .engine_output import RequestOutput, encode_prompts
from .limits import fit_to_context

__all__ = [
    "HfBnbBackend",
    "LoadedModel",
    "SeqSpec",
    "StaticBatchGenerator",
    "kv_bytes_per_token",
    "load_model",
]

log = logging.getLogger(__name__)
_DTYPES = ("int8", "bfloat16", "float16", "float32")


def kv_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs: 2 (K and V) × layers × KV heads × head dim × dtype bytes."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes)


@dataclass(slots=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    load_s: float


def load_model(path: str, dtype: str = "int8", device: str = "cuda", cudnn_sdpa: bool = False) -> LoadedModel:
    """Load a model the way production does (from_pretrained; bitsandbytes for int8)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ConfigError(
            f"backend.engine_args.dtype={dtype!r} must be one of {_DTYPES}", field="engine_args.dtype"
        )
    if dtype == "int8" and device != "cuda":
        raise ConfigError(
            "backend.engine_args.dtype='int8' needs device 'cuda' (bitsandbytes)", field="engine_args"
        )
    if device == "cuda" and not cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {}
    if dtype == "int8":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
        kwargs["device_map"] = device
    else:
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if dtype != "int8":
        model = model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, device, dtype, time.monotonic() - t0)


@dataclass(slots=True)
class SeqSpec:
    """One sequence to generate, with its own sampling parameters."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    # Called (from the worker thread) with (text delta, finish_reason or None, tokens since the last call).
    on_text: Callable[[str, str | None, int], None] | None = None
    # Called (from the worker thread) once per generated token.
    on_token: Callable[[], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    tokens_reported: int = 0  # generated tokens whose text went to ``on_text``


@dataclass(slots=True)
class BatchStats:
    batch_size: int
    prompt_len: int
    steps: int
    prefill_s: float
    decode_s: float


class StaticBatchGenerator:
    """Left-padded static batch, one forward per step, per-sequence stopping."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        cfg = loaded.model.config
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 4096))
        eos = loaded.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    def run(self, seqs: Sequence[SeqSpec], stop: threading.Event | None = None) -> BatchStats:
        """Generate the batch; ``stop`` (checked every step) ends every sequence with ``abort``."""
        import torch

        tok, model, device = self.loaded.tokenizer, self.loaded.model, self.loaded.device
        pad_id = tok.pad_token_id
        width = max(len(s.prompt_ids) for s in seqs)
        steps = max(s.max_tokens for s in seqs)
        if width + steps > self.max_positions:
            raise BadRequest(
                f"prompt ({width} tokens) + max_tokens ({steps}) exceeds the model's {self.max_positions}"
            )
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[row, width - len(s.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [self._generator(s.seed) for s in seqs]
        active = [True] * len(seqs)
        t0 = time.monotonic()
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :]
            t1 = time.monotonic()
            step = 0
            while step < steps and any(active):
                if stop is not None and stop.is_set():
                    for row, s in enumerate(seqs):
                        if active[row]:
                            self._finish(s, "abort")
                            active[row] = False
                    break
                next_ids = self._sample(logits, seqs, generators, active)
                host_ids = next_ids.tolist()
                for row, s in enumerate(seqs):
                    if active[row]:
                        active[row] = self._advance(s, host_ids[row])
                step += 1
                if not any(active) or step >= steps:
                    break
                mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], dim=-1)
                positions = positions[:, -1:] + 1
                out = model(
                    input_ids=next_ids.unsqueeze(-1),
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :]
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.monotonic()
        for row, s in enumerate(seqs):
            if active[row]:
                self._finish(s, "length")
        return BatchStats(len(seqs), width, step, t1 - t0, t2 - t1)

    def _generator(self, seed: int | None) -> Any:
        import torch

        if seed is None:
            return None
        g = torch.Generator(device=self.loaded.device)
        g.manual_seed(seed)
        return g

    @staticmethod
    def _sample(logits: Any, seqs: Sequence[SeqSpec], generators: list[Any], active: list[bool]) -> Any:
        import torch

        greedy = logits.argmax(dim=-1)
        if all(s.temperature == 0 for s, a in zip(seqs, active, strict=True) if a):
            return greedy
        result = greedy.clone()
        for row, s in enumerate(seqs):
            if not active[row] or s.temperature == 0:
                continue
            probs = torch.softmax(logits[row].float() / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            result[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
        return result

    def _advance(self, s: SeqSpec, token: int) -> bool:
        """Take one token for s; return whether it goes on."""
        if s.cancelled():
            self._finish(s, "abort")
            return False
        if token in self.eos_ids and not s.ignore_eos:
            self._finish(s, "stop")
            return False
        s.generated.append(token)
        if s.on_token is not None:
            s.on_token()
        if s.on_text is None and not s.stop:  # nobody reads the text (calibration): count tokens only
            if len(s.generated) >= s.max_tokens:
                s.finish_reason = "length"
                return False
            return True
        text = self.loaded.tokenizer.decode(s.generated, skip_special_tokens=True)
        for stop in s.stop:
            cut = text.find(stop)
            if cut >= 0:
                self._emit(s, text[:cut], "stop")
                return False
        if len(s.generated) >= s.max_tokens:
            self._emit(s, text, "length")
            return False
        if not text.endswith("\ufffd"):  # wait for a whole character
            self._emit(s, text, None)
        return True

    def _emit(self, s: SeqSpec, text: str, finish: str | None) -> None:
        delta = text[len(s.text) :] if text.startswith(s.text) else ""
        s.text = text if text.startswith(s.text) else s.text
        if finish is not None:
            s.finish_reason = finish
        if s.on_text is not None and (delta or finish is not None):
            s.on_text(delta, finish, len(s.generated) - s.tokens_reported)
            s.tokens_reported = len(s.generated)

    def _finish(self, s: SeqSpec, reason: str) -> None:
        if s.finish_reason is None:
            self._emit(s, s.text, reason)


class HfBnbBackend:
    name = "hf-bnb"
    shape: ClassVar[EngineShape] = "static"
    metrics_registry: CollectorRegistry | None = None

    def __init__(self, settings: BackendSettings, batching: BatchingSettings) -> None:
        assert settings.model is not None
        args = dict(settings.engine_args)
        self._path = settings.model
        self._dtype = str(args.pop("dtype", "int8"))
        self._device = str(args.pop("device", "cuda"))
        self._cudnn_sdpa = bool(args.pop("cudnn_sdpa", False))
        if args:
            raise ConfigError(
                f"backend.engine_args.{sorted(args)[0]} is not an hf-bnb option (dtype, device, cudnn_sdpa)",
                field="backend.engine_args",
            )
        self._served = settings.served_model_name or settings.model
        self._default_max_tokens = batching.expected_completion_tokens
        self._gen: StaticBatchGenerator | None = None
        self._headroom = Headroom()
        self._kv_bytes = 0
        self._gpu_worker = ThreadPoolExecutor(1, thread_name_prefix="hf-bnb-gpu")
        self._tokenizer_worker = ThreadPoolExecutor(1, thread_name_prefix="hf-bnb-tokenizer")

    @property
    def model(self) -> str:
        return self._served

    @property
    def _generator(self) -> StaticBatchGenerator:
        if self._gen is None:
            raise RuntimeError("hf-bnb backend used before start()")
        return self._gen

    async def start(self, progress: Progress) -> None:
        progress(f"loading {self._path} ({self._dtype} on {self._device})")
        loaded = await asyncio.get_running_loop().run_in_executor(
            self._gpu_worker, load_model, self._path, self._dtype, self._device, self._cudnn_sdpa
        )
        log.info(
            "hf-bnb: loaded %s (%s on %s) in %.1f s", self._path, self._dtype, self._device, loaded.load_s
        )
        self._gen = StaticBatchGenerator(loaded)
        self._kv_bytes = kv_bytes_per_token(loaded.model.config, 4 if self._dtype == "float32" else 2)
        self._update_headroom()

    async def close(self) -> None:
        for worker in (self._gpu_worker, self._tokenizer_worker):
            await asyncio.to_thread(worker.shutdown, True)
        self._gen = None

    def _update_headroom(self) -> None:
        if self._device != "cuda":
            return
        import torch

        free_bytes, total_bytes = torch.cuda.mem_get_info()
        self._headroom = Headroom(
            kv_free_tokens=free_bytes // self._kv_bytes, kv_capacity_tokens=total_bytes // self._kv_bytes
        )

    def health(self) -> EngineHealth:
        return UP

    def headroom(self) -> Headroom:
        return self._headroom

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        check_fields(request, BASIC_FIELDS, self.name)
        gen = self._generator
        prompts = await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_worker, encode_prompts, gen.loaded.tokenizer, request
        )
        fitted = fit_to_context(
            request, [len(p) for p in prompts], gen.max_positions, self._default_max_tokens
        )
        return msgspec.structs.replace(fitted, engine_input=prompts)

    def batch_fits(self, requests: Sequence[GenerationRequest]) -> bool:
        """Left padding makes every row as long as the longest prompt, and the batch runs as many steps
        as the largest ``max_tokens``: both together must fit the model's positions."""
        width = max((max(r.prompt_tokens or (0,)) for r in requests), default=0)
        steps = max((r.max_tokens or self._default_max_tokens for r in requests), default=0)
        return width + steps <= self._generator.max_positions

    def _specs(self, job: Job, output: RequestOutput, loop: asyncio.AbstractEventLoop) -> list[SeqSpec]:
        request = job.request
        prompts: list[list[int]] = request.engine_input
        specs = []

        def on_token() -> None:
            loop.call_soon_threadsafe(job.generated, 1)

        for index, ids in enumerate(prompts):
            output.prompt_tokens[index] = len(ids)

            def on_text(
                delta: str, finish: str | None, tokens: int, out: RequestOutput = output, k: int = index
            ) -> None:
                loop.call_soon_threadsafe(out.add, k, delta, finish, tokens)

            specs.append(
                SeqSpec(
                    prompt_ids=ids,
                    max_tokens=request.max_tokens or self._default_max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    stop=request.stop,
                    seed=request.seed,
                    ignore_eos=request.ignore_eos,
                    on_text=on_text,
                    on_token=on_token,
                    cancelled=job.cancelled,
                )
            )
        return specs

    def _run_on_gpu(self, gen: StaticBatchGenerator, seqs: list[SeqSpec], stop: threading.Event) -> None:
        """In the GPU worker: the batch, then the memory headroom it leaves."""
        try:
            gen.run(seqs, stop)
        finally:
            self._update_headroom()

    async def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult | BaseException]:
        gen = self._generator
        loop = asyncio.get_running_loop()
        outputs = [RequestOutput(job) for job in jobs]
        seqs = [spec for job, out in zip(jobs, outputs, strict=True) for spec in self._specs(job, out, loop)]
        stop = threading.Event()
        worker = loop.run_in_executor(self._gpu_worker, self._run_on_gpu, gen, seqs, stop)
        try:
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            stop.set()
            await _until_done(worker)  # the GPU slot stays taken until the worker has stopped
            raise
        except BadRequest as exc:
            return [exc for _ in jobs]
        by_output = iter(seqs)
        for output in outputs:
            for index in range(output.job.request.sequences):
                output.completion_tokens[index] = len(next(by_output).generated)
        return [output.result() for output in outputs]


async def _until_done(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` to finish, whatever cancellations arrive meanwhile."""
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except Exception:
            return

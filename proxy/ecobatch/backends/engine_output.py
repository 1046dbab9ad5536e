"""Turn an engine's per-sequence text deltas into OpenAI responses and stream chunks.

Shared by the backends that generate text themselves (simulated, vllm-async, hf-bnb); the vllm-http
backend passes the upstream's own OpenAI JSON through instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..domain import GenerationRequest, GenerationResult, Usage
from ..openai_api import (
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    message_text,
)
from .base import Job

__all__ = ["RequestOutput", "encode_prompts"]


def encode_prompts(tokenizer: Any, request: GenerationRequest) -> list[list[int]]:
    """Token ids per sequence: each completion prompt with the tokenizer's special tokens, or the chat
    rendered by the model's own chat template (which places its own BOS)."""
    if request.kind == "completion":
        return [tokenizer.encode(p) for p in request.prompts]
    messages = [{"role": str(m["role"]), "content": message_text(m)} for m in request.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [tokenizer.encode(text, add_special_tokens=False)]


@dataclass(slots=True)
class RequestOutput:
    """Accumulates one request's sequences (one per prompt) and emits stream chunks as text arrives."""

    job: Job
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    _role_sent: bool = False

    def __post_init__(self) -> None:
        n = self.job.request.sequences
        self.texts = [""] * n
        self.finish_reasons = [None] * n
        self.prompt_tokens = [0] * n
        self.completion_tokens = [0] * n

    def add(self, index: int, text: str, finish_reason: str | None = None) -> None:
        """Append generated text to sequence ``index``; a finish reason closes it."""
        self.texts[index] += text
        if finish_reason is not None:
            self.finish_reasons[index] = finish_reason
        emit = self.job.emit
        if emit is None:
            return
        request = self.job.request
        if request.kind == "chat":
            if not self._role_sent:
                emit(chat_chunk(request, {"role": "assistant", "content": ""}))
                self._role_sent = True
            if text or finish_reason is not None:
                emit(chat_chunk(request, {"content": text} if text else {}, finish_reason))
        elif text or finish_reason is not None:
            emit(completion_chunk(request, index, text, finish_reason))

    @property
    def usage(self) -> Usage:
        return Usage(sum(self.prompt_tokens), sum(self.completion_tokens))

    def result(self) -> GenerationResult:
        """The final result; a streaming request gets its usage chunk here when it asked for one."""
        request = self.job.request
        usage = self.usage
        if self.job.emit is not None:
            if request.include_usage:
                if request.kind == "chat":
                    self.job.emit(chat_chunk(request, None, usage=usage))
                else:
                    self.job.emit(completion_chunk(request, None, usage=usage))
            return GenerationResult(usage=usage)
        if request.kind == "chat":
            body = chat_response(request, self.texts[0], self.finish_reasons[0], usage)
        else:
            body = completion_response(request, self.texts, self.finish_reasons, usage)
        return GenerationResult(usage=usage, body=body)

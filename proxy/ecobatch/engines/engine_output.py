"""What engines share to answer in ``EngineOutput`` and ``GenerationResult`` (``domain``): the prompts as
token ids, a static engine's per-request output as its text comes, and a request's outputs gathered
into its result. Nothing here knows the client's format: the HTTP layer renders it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..domain import EngineOutput, GenerationRequest, GenerationResult, TextDelta, Usage, message_text
from ..errors import BackendFailed
from .base import Job

__all__ = ["RequestOutput", "Transcript", "encode_prompts"]


def encode_prompts(tokenizer: Any, request: GenerationRequest) -> list[list[int]]:
    """Token ids per sequence: each completion prompt with the tokenizer's special tokens, or the chat
    rendered by the model's own chat template (which places its own BOS)."""
    if request.kind == "completion":
        return [tokenizer.encode(p) for p in request.prompts]
    messages = [{"role": str(m["role"]), "content": message_text(m)} for m in request.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [tokenizer.encode(text, add_special_tokens=False)]


class Transcript:
    """A request's outputs gathered into its result: each sequence's text and finish reason (not for a
    stream, whose outputs went to its client) and the engine's usage from the last output."""

    __slots__ = ("_finish_reasons", "_keep_text", "_texts", "_upstream", "_usage")

    def __init__(self, request: GenerationRequest) -> None:
        self._keep_text = not request.stream
        self._texts: list[list[str]] = [[] for _ in range(request.sequences)]  # joined once, at the end
        self._finish_reasons: list[str | None] = [None] * request.sequences
        self._usage: Usage | None = None
        self._upstream: Mapping[str, Any] | None = None

    def add(self, output: EngineOutput) -> None:
        if output.usage is not None:
            self._usage = output.usage
        if not self._keep_text:
            return
        if output.upstream is not None:
            self._upstream = output.upstream
        for d in output.deltas:
            self._texts[d.index].append(d.text)
            if d.finish_reason is not None:
                self._finish_reasons[d.index] = d.finish_reason

    def result(self) -> GenerationResult:
        """The request's result; an engine that ended without its usage failed the request."""
        if self._usage is None:
            raise BackendFailed("the engine ended the request without reporting its usage")
        if not self._keep_text:
            return GenerationResult(self._usage)
        return GenerationResult(
            self._usage,
            tuple("".join(pieces) for pieces in self._texts),
            tuple(self._finish_reasons),
            upstream=self._upstream,
        )


class RequestOutput:
    """A static engine's output for one request (a sequence per prompt) as its text arrives: a streamed
    request's client gets each piece as an ``EngineOutput`` (``job.emit``), the last one with the usage;
    the others get the whole text in their result."""

    __slots__ = ("completion_tokens", "finish_reasons", "job", "prompt_tokens", "texts")

    def __init__(self, job: Job) -> None:
        n = job.request.sequences
        self.job = job
        self.texts = [""] * n
        self.finish_reasons: list[str | None] = [None] * n
        self.prompt_tokens = [0] * n
        self.completion_tokens = [0] * n

    def add(self, index: int, text: str, finish_reason: str | None = None, tokens: int = 0) -> None:
        """Append text that ``tokens`` generated tokens made to sequence ``index``; a finish reason
        closes it."""
        self.texts[index] += text
        if finish_reason is not None:
            self.finish_reasons[index] = finish_reason
        emit = self.job.emit
        if emit is not None and (text or finish_reason is not None):
            emit(EngineOutput((TextDelta(index, text, finish_reason),), new_tokens=tokens))

    @property
    def usage(self) -> Usage:
        return Usage(sum(self.prompt_tokens), sum(self.completion_tokens))

    def result(self) -> GenerationResult:
        """The final result; a stream's last output (its usage) goes to its client here."""
        usage = self.usage
        if self.job.emit is not None:
            self.job.emit(EngineOutput(usage=usage))
            return GenerationResult(usage)
        return GenerationResult(usage, tuple(self.texts), tuple(self.finish_reasons))

"""Concrete types at the engine boundary: what a request is, what comes back, what can go wrong.

The serving layer and the notebook API speak only these types; they never see a tracer, a cache or
a device array. Everything here is plain Python, importable without touching a device.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, with Workers AI's ranges (validated by the server's schema).

    temperature 0 means greedy. top_p >= 1 means no nucleus filter and top_p 0 means greedy (the
    smallest nucleus); top_k None means none.
    repetition_penalty follows transformers/TGI over prompt + generated tokens (1 = off; 0 is treated
    as off rather than divided by). frequency/presence penalties follow OpenAI over generated tokens.
    seed None: the engine draws one. The same seed and inputs give the same tokens whatever else is
    in the batch.
    """

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]  # already tokenized, BOS included
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    adapter: str | None = None  # key of a LoRA adapter loaded in the engine's bank, None = base


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """A piece of generated text (whole UTF-8 characters only) and the token ids it came from."""

    text: str
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos / end_of_turn), "length" (max_tokens or the context limit), "cancelled"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineError(Exception):
    """Base of errors the server maps onto Workers AI's error codes."""


class InputTooLong(EngineError):
    """Prompt (or prompt + max_tokens) over the model's limits -> Workers AI 5021 (HTTP 413)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit_input: int, limit_total: int):
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.limit_input, self.limit_total = limit_input, limit_total
        super().__init__(
            f"the input ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context "
            f"window: max input tokens {limit_input}, max total tokens {limit_total}")


class QueueFull(EngineError):
    """The request queue is at capacity -> Workers AI 3040 (HTTP 429)."""


class UnknownAdapter(EngineError):
    """The named LoRA adapter is not loaded -> Workers AI 3037."""


class RequestFailed(EngineError):
    """The request failed inside the engine; other requests are unaffected."""


class RequestHandle(Protocol):
    """What `submit` returns: iterate for stream events, or wait for the whole completion."""

    def __iter__(self) -> Iterator[StreamEvent]: ...

    def result(self, timeout: float | None = None) -> Completion: ...

    def cancel(self) -> None: ...

"""Concrete types at the engine boundary: what a request is, what comes back, what can go wrong.

The serving layer and the notebook API speak only these types; they never see a tracer, a cache or
a device array. Everything here is plain Python, importable without touching a device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol, Sequence

from gemma_jax.sampling import SamplingParams  # re-export: the engine boundary speaks it

DEFAULT_MAX_TOKENS = 256  # a request's max_tokens when it names none (Workers AI's default for this model)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]  # already tokenized, BOS included
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: what the context window leaves (at least 1)
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


def check_limits(prompt_tokens: int, max_tokens: int, max_input: int, max_total: int, *, clip: bool = False) -> int:
    """The one rule for a request's size: how many tokens it may draw, or why it may not run.

    ValueError if prompt_tokens or max_tokens is below 1; InputTooLong if the prompt is over
    `max_input` or prompt + max_tokens over `max_total`. clip: cut max_tokens to the room the prompt
    leaves (at least 1) instead of refusing it. Returns max_tokens (clipped if asked).
    """
    if prompt_tokens < 1:
        raise ValueError("a prompt needs at least one token (BOS)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if clip:
        max_tokens = max(1, min(max_tokens, max_total - prompt_tokens))
    if prompt_tokens > max_input or prompt_tokens + max_tokens > max_total:
        raise InputTooLong(prompt_tokens, max_tokens, max_input, max_total)
    return max_tokens


class QueueFull(EngineError):
    """The request queue is at capacity -> Workers AI 3040 (HTTP 429)."""


class UnknownAdapter(EngineError):
    """The named LoRA adapter is not loaded -> Workers AI 3037."""


class RequestFailed(EngineError):
    """The request failed inside the engine; other requests are unaffected."""


class InvalidRequest(EngineError, ValueError):
    """The request cannot be served as asked (a sampling parameter no row can hold, a token id
    outside the vocabulary) -> Workers AI 5006 (HTTP 400). It fails alone: requests admitted with
    it are served without it."""


class RequestHandle(Protocol):
    """What `submit` returns: iterate for stream events, or wait for the whole completion."""

    def __iter__(self) -> Iterator[StreamEvent]: ...

    def next(self, timeout: float | None = None) -> StreamEvent | None:
        """The next event, None once finished; TimeoutError if none within `timeout`, RequestFailed."""

    def result(self, timeout: float | None = None) -> Completion: ...

    def cancel(self) -> None: ...


class StepEngine(Protocol):
    """What `scheduler.Scheduler` drives (`paged.PagedEngine`; `multihost.LeaderEngine` over one).
    One thread adds, cancels and steps; the adapter calls may come from any thread."""

    config: Any
    max_seqs: int
    bank: Any

    def check(self, prompt_tokens: int, max_tokens: int, *, clip: bool = False) -> int: ...

    def can_add(self, prompt_tokens: int) -> bool: ...

    def add(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams, adapter: int) -> int: ...

    def cancel(self, seq_id: int) -> None: ...

    def step(self, steps: int | None = None) -> list: ...

    def reset(self) -> list[int]: ...

    def busy(self) -> bool: ...

    def warmup(self, progress=None) -> None: ...

    def compile_counts(self) -> dict[str, int]: ...

    def stats(self) -> dict[str, int]: ...

    def adapter_id(self, name: str) -> int: ...

    def adapters(self) -> dict[str, int]: ...

    def load_adapter(self, name: str, adapter, *, require_model_type: bool = False) -> int: ...

    def unload_adapter(self, name: str) -> None: ...

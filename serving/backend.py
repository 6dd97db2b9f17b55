"""The one object the HTTP layer talks to: tokenizer + scheduler + model name + adapters.

The Flask app never touches the engine, a device or a tokenizer directly; it hands a validated body
to a `Backend` and gets back an engine `Request`, then submits it and reads the handle. That keeps
the routes testable with a fake scheduler whose answers are computable by hand
(`tests/serving_fakes.py`), exactly as JetStream tests its orchestrator with a mock engine, and lets
a real `gemma_jax.engine.scheduler.Scheduler(engine, tokenizer)` drop in unchanged.

What a Backend decides (and the app does not):
- prompting: `prompt` -> the default scoped prompt (the chat template as one user turn); `raw` ->
  the text verbatim after BOS; `messages` -> the chat template (a bad role order is a bad input);
- sampling: each Workers AI / OpenAI parameter -> `SamplingParams`, integers made ints (JSON Schema
  calls 5.0 an integer);
- adapters: `lora` (finetune id or name) -> the adapter key the engine knows (the finetune id).

The limits are the engine's alone, checked in one place: `scheduler.submit` (through
`PagedEngine.check`) refuses `max_tokens < 1` (ValueError) and prompts over the limits
(`InputTooLong`) and resolves `max_tokens=None` (the rest of the context window).

Adapter loading itself belongs to the LoRA code: `load_adapter_fn(key, directory)` must validate the
PEFT files, load them into the engine's adapter bank under `key` and raise `ValueError` if they are
not a valid adapter for this model; `unload_adapter_fn(key)` frees the bank entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from gemma_jax.engine.api import DEFAULT_MAX_TOKENS, Request, RequestHandle, SamplingParams, UnknownAdapter
from gemma_jax import tokenizer as gemma_tokenizer
from gemma_jax.lora import BankFull

DEFAULT_MODEL = "@hf/google/gemma-7b-it"


class SchedulerLike(Protocol):
    def check(self, prompt_tokens: int, max_tokens: int | None = None) -> int: ...

    def submit(self, request: Request) -> RequestHandle: ...

    def stats(self) -> Mapping[str, Any]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class TokenizerLike(Protocol):
    @property
    def bos_id(self) -> int: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


class BadRequest(ValueError):
    """The request is well-formed JSON of the right schema but cannot be served as asked."""


class AdapterError(ValueError):
    """Uploaded adapter files are not a valid LoRA adapter for the served model."""


class AdapterBankFull(AdapterError):
    """The adapter is valid but every LoRA slot of the engine is taken (capacity: 429 / 3040)."""


@dataclasses.dataclass(frozen=True)
class GenerationInput:
    """One generation, independent of the API that asked for it."""

    prompt: str | None = None
    raw: bool = False
    messages: Sequence[Mapping[str, Any]] | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: whatever the context window leaves
    sampling: SamplingParams = SamplingParams()
    lora: str | None = None


_FLOAT_PARAMS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_INT_PARAMS = ("top_k", "seed")


def sampling_from(body: Mapping[str, Any]) -> SamplingParams:
    """The SamplingParams for the parameters present in `body` (others keep their defaults)."""
    given: dict[str, Any] = {}
    for key in _FLOAT_PARAMS:
        if body.get(key) is not None:
            given[key] = float(body[key])
    for key in _INT_PARAMS:
        if body.get(key) is not None:
            given[key] = int(body[key])
    return dataclasses.replace(SamplingParams(), **given)


class Backend:
    """Tokenizer + scheduler + model name + the loaded adapters (id -> name)."""

    def __init__(
        self,
        scheduler: SchedulerLike,
        tokenizer: TokenizerLike,
        *,
        model_name: str = DEFAULT_MODEL,
        load_adapter_fn: Callable[[str, str], None] | None = None,
        unload_adapter_fn: Callable[[str], None] | None = None,
    ):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self._load_fn, self._unload_fn = load_adapter_fn, unload_adapter_fn
        self._adapters: dict[str, str] = {}  # finetune id (= engine adapter key) -> name
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler, then release the adapters this backend loaded: the engine (and its
        bank) may outlive it, and a new app over the same engine reloads them from its data dir."""
        self.scheduler.stop()
        with self._lock:
            loaded, self._adapters = list(self._adapters), {}
        if self._unload_fn is not None:
            for finetune_id in loaded:
                with contextlib.suppress(UnknownAdapter):  # already gone: nothing to release
                    self._unload_fn(finetune_id)

    def serves(self, model: str) -> bool:
        return model == self.model_name

    # -- requests -----------------------------------------------------------------------------
    def input_from_body(self, body: Mapping[str, Any]) -> GenerationInput:
        """A schema-validated Workers AI body -> GenerationInput."""
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        return GenerationInput(
            prompt=body.get("prompt"), raw=bool(body.get("raw", False)), messages=body.get("messages"),
            max_tokens=int(max_tokens), sampling=sampling_from(body), lora=body.get("lora"))

    def encode(self, gen: GenerationInput) -> list[int]:
        """Prompt ids, BOS first: raw text verbatim, a prompt as one user turn, or the chat template."""
        if gen.messages is not None:
            try:
                return list(gemma_tokenizer.encode_chat(self.tokenizer, gen.messages))
            except ValueError as e:  # ChatTemplateError is a ValueError
                raise BadRequest(f"messages: {e}") from None
        if gen.prompt is None:
            raise BadRequest("either prompt or messages is required")
        text = gen.prompt if gen.raw else gemma_tokenizer.format_prompt(gen.prompt)
        return list(self.tokenizer.encode(text, add_bos=True))

    def make_request(self, gen: GenerationInput) -> Request:
        """Resolve the adapter and encode (the limits are `submit`'s to check). Raises
        UnknownAdapter, BadRequest."""
        adapter = self.resolve_adapter(gen.lora) if gen.lora is not None else None
        ids = self.encode(gen)
        return Request(prompt_ids=tuple(ids), max_tokens=gen.max_tokens, sampling=gen.sampling, adapter=adapter)

    def submit(self, request: Request) -> RequestHandle:
        return self.scheduler.submit(request)

    def stats(self) -> dict[str, Any]:
        return dict(self.scheduler.stats())

    # -- adapters -----------------------------------------------------------------------------
    def load_adapter(self, finetune_id: str, name: str, directory: str | os.PathLike) -> None:
        """Validate + load an adapter into the engine; AdapterError if the files are not usable."""
        if self._load_fn is None:
            raise AdapterError("this server was started without LoRA support")
        try:
            self._load_fn(finetune_id, os.fspath(directory))
        except AdapterError:
            raise
        except BankFull as e:
            raise AdapterBankFull(f"{e}; delete a finetune, or start the server with more --lora-slots") from e
        except (ValueError, KeyError, OSError) as e:
            raise AdapterError(str(e) or type(e).__name__) from e
        with self._lock:
            self._adapters[finetune_id] = name

    def remove_adapter(self, finetune_id: str) -> None:
        with self._lock:
            known = self._adapters.pop(finetune_id, None) is not None
        if known and self._unload_fn is not None:
            self._unload_fn(finetune_id)

    def adapters(self) -> dict[str, str]:
        """Loaded adapters, finetune id -> name."""
        with self._lock:
            return dict(self._adapters)

    def resolve_adapter(self, lora: str) -> str:
        """Finetune id or name -> the engine's adapter key (the id). UnknownAdapter otherwise."""
        with self._lock:
            if lora in self._adapters:
                return lora
            for finetune_id, name in self._adapters.items():
                if name == lora:
                    return finetune_id
        raise UnknownAdapter(lora)

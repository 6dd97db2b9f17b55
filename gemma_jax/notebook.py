"""The notebook API: text in, text out, on top of the engine and its scheduler.

    model = gemma_jax.load()                               # embedded 270M, or load("ckpt-dir")
    model = Model(config, params, tokenizer)               # or from parts
    generate(model, ["Why is the sky blue?", "Write a haiku"], temperature=0, max_tokens=64)
    for piece in stream(model, "Tell me a story", seed=7): print(piece, end="")
    logits(model, "The capital of France is")          # np.ndarray [T, V] float32

Prompts are text (`chat=True` wraps each in Gemma's chat template as one user turn, as Workers AI
does for `prompt`; `chat=False`, the default, sends it verbatim after BOS), a list of chat messages
(`[{"role": "user", "content": ...}]`, always templated) or token ids. Sampling keywords are those
of `SamplingParams` (temperature, top_p, top_k, seed, repetition_penalty, frequency_penalty,
presence_penalty). `max_tokens` is cut to what the context window leaves, rather than refused
(`PagedEngine.check(..., clip=True)`, the engine's one limits rule); a prompt over the input limit is
refused with `InputTooLong`.

The model starts its engine and scheduler thread on first use (a daemon thread, so a notebook exits
cleanly); `model.close()` stops it. `logits` runs the plain model forward, no engine involved.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from gemma_jax import tokenizer as tokenizer_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.engine.api import DEFAULT_MAX_TOKENS, Request, SamplingParams
from gemma_jax.engine.build import build_engine
from gemma_jax.engine.paged import PagedEngine
from gemma_jax.engine.scheduler import Scheduler
from gemma_jax.model import forward
from gemma_jax.weights.load import load_parts

Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]


@dataclasses.dataclass(eq=False)
class Model:
    """Config + params + tokenizer; `engine_options` go to `build_engine` (max_seqs, page_size, ...).

    Pass `engine` to reuse an already compiled engine for these params (one scheduler drives an
    engine at a time: close the model before another scheduler uses it).
    """

    config: GemmaConfig
    params: Any = dataclasses.field(repr=False)
    tokenizer: Any = dataclasses.field(repr=False)
    engine_options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"max_seqs": 4})
    engine: PagedEngine | None = dataclasses.field(default=None, repr=False)
    _scheduler: Scheduler | None = dataclasses.field(default=None, init=False, repr=False)

    def scheduler(self) -> Scheduler:
        """The running scheduler (engine built and thread started on first call)."""
        if self._scheduler is None:
            if self.engine is None:
                self.engine = build_engine(self.config, self.params, **{"max_seqs": 4, "adapter_slots": 0,
                                                                        **self.engine_options})
            self._scheduler = Scheduler(self.engine, self.tokenizer).start()
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None


def load(checkpoint: str | None = None, dtype="float32", **engine_options) -> Model:
    """A ready Model: `load()` is the embedded 270M; `load("checkpoints/gemma-7b-it", "bfloat16")`."""
    config, params, tokenizer = load_parts(checkpoint, dtype)
    return Model(config, params, tokenizer, engine_options={"max_seqs": 4, **engine_options})


def encode(model: Model, prompt: Prompt, chat: bool = False) -> list[int]:
    """Token ids (BOS first) of a text prompt, a list of chat messages or ids (returned as given)."""
    if isinstance(prompt, str):
        text = tokenizer_lib.format_prompt(prompt) if chat else prompt
        return list(model.tokenizer.encode(text, add_bos=True))
    items = list(prompt)
    if items and isinstance(items[0], Mapping):
        return tokenizer_lib.encode_chat(model.tokenizer, items)
    return [int(i) for i in items]


def _request(model: Model, prompt: Prompt, chat: bool, max_tokens: int, adapter: str | None,
             sampling: Mapping[str, Any]) -> Request:
    ids = encode(model, prompt, chat)
    model.scheduler()  # builds the engine: its limits are the ones that count
    max_tokens = model.engine.check(len(ids), max_tokens, clip=True)
    return Request(prompt_ids=tuple(ids), max_tokens=max_tokens, sampling=SamplingParams(**sampling), adapter=adapter)


def generate(model: Model, prompts: Prompt | Sequence[Prompt], *, max_tokens: int = DEFAULT_MAX_TOKENS, chat: bool = False,
             adapter: str | None = None, **sampling) -> list[str]:
    """Generate for every prompt (batched together by the scheduler); one string per prompt."""
    first = None if isinstance(prompts, str) else next(iter(prompts), None)
    single = isinstance(prompts, str) or isinstance(first, (int, np.integer, Mapping))  # text, ids, chat
    batch = [prompts] if single else list(prompts)
    scheduler = model.scheduler()
    handles = [scheduler.submit(_request(model, p, chat, max_tokens, adapter, sampling)) for p in batch]
    return [h.result().text for h in handles]


def stream(model: Model, prompt: Prompt, *, max_tokens: int = DEFAULT_MAX_TOKENS, chat: bool = False,
           adapter: str | None = None, **sampling) -> Iterator[str]:
    """Yield the text as it is generated, in whole characters. Closing the iterator cancels."""
    handle = model.scheduler().submit(_request(model, prompt, chat, max_tokens, adapter, sampling))
    try:
        for event in handle:
            yield event.text
    finally:
        handle.cancel()


@functools.lru_cache(maxsize=8)
def _forward_fn(config: GemmaConfig):
    return jax.jit(lambda params, tokens, positions: forward(params, tokens, positions, None, config=config)[0])


def logits(model: Model, prompt: Prompt, chat: bool = False) -> np.ndarray:
    """Next-token logits at every prompt position: float32 [T, V] (row t predicts token t + 1).

    The prompt is padded to a power of two (causal attention: padding after it changes nothing), so
    prompts of similar length share one compilation.
    """
    ids = encode(model, prompt, chat)
    padded = 1 << max(4, (len(ids) - 1).bit_length())
    tokens = np.full((1, padded), model.config.pad_id, np.int32)
    tokens[0, : len(ids)] = ids
    positions = np.arange(padded, dtype=np.int32)[None]
    out = _forward_fn(model.config)(model.params, tokens, positions)  # [1, padded, V]
    return np.asarray(out[0, : len(ids)])

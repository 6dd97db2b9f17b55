"""Shared by the engine and scheduler tests: an independent greedy reference and cached tiny engines.

`naive_greedy` is the reference the engine must match token for token: the plain model `forward`
with no KV cache, recomputing the whole sequence for every new token (padded to one fixed length so
it compiles once; causal attention makes the padding after the last real token irrelevant).
To check the real 270M model, load its params and call
`assert_engine_matches_naive(config, params, prompts, max_tokens)`.

`run_to_completion` is a synchronous driver of the engine's host shell (prefill every prompt, decode
until all are done), for tests that need the engine without the scheduler's threads.

Params and engines are cached per process (random init compiles slowly on two CPU cores), so every
test module shares them; the decode state belongs to its caller, and each driver starts from a fresh
`init_state()` (which also resets what the engine recorded about its slots).
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import config as config_lib
from gemma_jax.engine.api import SamplingParams
from gemma_jax.engine.engine import Engine
from gemma_jax.model import forward
from gemma_jax.params import init_params
from gemma_jax.tokenizer import Tokenizer

# Small limits so the tests use few, small buckets: prompts <= 32 tokens, 64 in all.
TEST_LIMITS = config_lib.Limits(max_input_tokens=32, max_total_tokens=64, max_batch_prefill_tokens=64)
ENGINE_KW = dict(slots=4, prefill_buckets=(16, 32), prefill_batches=(1, 4), steps_per_call=4)


@functools.lru_cache(maxsize=None)
def _full_forward(config):
    """Jitted no-cache forward: tokens [B, T] -> logits [B, T, V] (one compile per config and shape)."""
    positions = lambda t: jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
    return jax.jit(lambda params, t: forward(params, t, positions(t), None, config=config)[0])


def naive_greedy(config, params, prompts, max_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt by full recompute (no cache), one prompt at a time, every
    sequence padded to the model's total-token limit; stops after a stop id (included)."""
    step, pad_to = _full_forward(config), config.limits.max_total_tokens
    out = []
    for prompt in prompts:
        seq, drawn = list(prompt), []
        while len(drawn) < max_tokens and not (drawn and drawn[-1] in config.stop_ids):
            tokens = np.zeros((1, pad_to), np.int32)
            tokens[0, : len(seq)] = seq
            drawn.append(int(np.argmax(np.asarray(step(params, tokens))[0, len(seq) - 1])))
            seq.append(drawn[-1])
        out.append(drawn)
    return out


def run_to_completion(engine: Engine, prompts: Sequence[Sequence[int]], *, max_tokens: int | Sequence[int] = 32,
                      sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(temperature=0.0),
                      rng: np.random.Generator | None = None, adapter_ids: Sequence[int] | None = None,
                      ) -> list[list[int]]:
    """Synchronous driver (tests): prefill every prompt (at most `slots`), decode until all are done,
    passing the slots still running as `live`; return each prompt's drawn tokens (stop token
    included). adapter_ids: bank ids (None: the base model)."""
    n = len(prompts)
    if n > engine.slots:
        raise ValueError(f"{n} prompts for {engine.slots} slots")
    if isinstance(sampling, SamplingParams):
        sampling = [sampling] * n
    limits = [engine.check(len(p), m) for p, m in zip(prompts, np.broadcast_to(max_tokens, (n,)).tolist())]
    state = engine.init_state()
    out: list[list[int]] = [[] for _ in range(n)]
    start = 0
    while start < n:
        count = engine.plan_prefill([len(p) for p in prompts[start:]], n - start)
        prefix = engine.prefill_prompts(prompts[start:start + count], sampling[start:start + count],
                                        limits[start:start + count],
                                        None if adapter_ids is None else adapter_ids[start:start + count], rng=rng)
        state = engine.insert(prefix, state, engine.pad_slots(range(start, start + count), prefix))
        for i, tok in enumerate(np.asarray(prefix.tokens)[:count]):
            out[start + i].append(int(tok))
        start += count
    finished = [_finished(engine, o, lim) for o, lim in zip(out, limits)]
    while not all(finished):
        state, tokens = engine.generate(state, live=[s for s in range(n) if not finished[s]])
        for row in np.asarray(tokens):  # [steps, B]
            for slot, tok in enumerate(row[:n]):
                if tok >= 0 and not finished[slot]:
                    out[slot].append(int(tok))
                    finished[slot] = _finished(engine, out[slot], limits[slot])
    return out


def _finished(engine: Engine, drawn: list[int], limit: int) -> bool:
    return len(drawn) >= limit or drawn[-1] in engine.config.stop_ids


def assert_engine_matches_naive(config, params, prompts, max_tokens: int, **engine_kw) -> list[list[int]]:
    engine = Engine(config, params, **engine_kw)
    got = run_to_completion(engine, prompts, max_tokens=max_tokens)
    want = naive_greedy(config, params, prompts, max_tokens)
    assert got == want
    return got


@functools.lru_cache(maxsize=None)
def tiny_params(name: str):
    config = getattr(config_lib, name)().replace(limits=TEST_LIMITS)
    # unsafe_rbg: the random init compiles in a fraction of threefry's time on CPU.
    return config, init_params(config, jax.random.key(0, impl="unsafe_rbg"))


def prompts_for(lengths, seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(3, vocab, size=n - 1).tolist() for n in lengths]


@functools.lru_cache(maxsize=None)
def tiny_engine(name: str, warm: bool = False):
    """(config, params, Engine) for a tiny config whose end_of_turn id is a token greedy decoding
    actually draws (so stop handling is exercised), shared by every test in the process. warm: every
    bucket compiled up front (`Engine.warmup`)."""
    config, params = tiny_params(name)
    probe = naive_greedy(config.replace(eos_id=-1, end_of_turn_id=-1), params, prompts_for([5]), 8)[0]
    config = config.replace(end_of_turn_id=probe[5])
    engine = Engine(config, params, **ENGINE_KW)
    if warm:
        engine.warmup()
    return config, params, engine


# The paged engine's test shape: 4 sequences, 4-position pages, a 16-token budget, 4 decode steps.
PAGED_KW = dict(max_seqs=4, page_size=4, num_pages=80, token_budget=16, decode_steps=4)


@functools.lru_cache(maxsize=None)
def tiny_paged(name: str, warm: bool = False):
    """(config, params, PagedEngine) over `tiny_engine`'s config (its end_of_turn id is drawn by
    greedy decoding), shared by every test in the process. warm: every executable compiled."""
    from gemma_jax.engine.build import build_engine

    config, params, _ = tiny_engine(name)
    engine = build_engine(config, params, **{**PAGED_KW, "adapter_slots": 0})
    if warm:
        engine.warmup()
    return config, params, engine


def paged_alone(engine, prompt: Sequence[int], max_tokens: int,
                sampling: SamplingParams = SamplingParams(temperature=0.0)) -> list[int]:
    """The tokens a paged engine draws for one request run alone (stop token included)."""
    seq = engine.add(prompt, max_tokens, sampling)
    return engine.run()[seq]


@functools.lru_cache(maxsize=None)
def trained_tokenizer() -> Tokenizer:
    """A 512-piece BPE sentencepiece model (the tiny configs' vocabulary) trained here, with byte
    fallback, so random ids include partial UTF-8 sequences that a stream must never split."""
    import sentencepiece as spm

    directory = pathlib.Path(tempfile.mkdtemp(prefix="gemma-jax-spm-"))
    words = ("the quick brown fox jumps over the lazy dog; café naïve 日本語 über straße "
             "hello world tokenizer streaming engine slots gemma jax numbers 0 1 2 3 42 1999").split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tok"), model_type="bpe",
        vocab_size=512, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, minloglevel=2, hard_vocab_limit=False)
    tok = Tokenizer.from_file(directory / "tok.model")
    assert tok.vocab_size == 512
    return tok

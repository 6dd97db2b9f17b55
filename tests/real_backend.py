"""The real serving stack for tests (a helper, not a test): a small trained sentencepiece tokenizer, a
tiny Gemma with random weights, the real PagedEngine + Scheduler behind `serving.factory.make_backend`,
served over HTTP on 127.0.0.1 by a werkzeug thread (`serving_fakes.LiveServer`).

Random init makes a tiny Gemma copy its input token (the tied embedding dominates the residual), so
the layer weights are scaled up 8x: the greedy continuation then varies token by token. What these
stacks are checked against is `engine_reference.naive_greedy`: the plain model forward, no cache,
recomputing the whole sequence for every token.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import sentencepiece as spm

from gemma_jax.config import GemmaConfig, Limits, tiny_mqa
from gemma_jax.engine.build import build_engine
from gemma_jax.engine.paged import PagedEngine
from gemma_jax.params import init_params
from gemma_jax.tokenizer import Tokenizer
from serving.app import create_app
from serving.backend import Backend
from serving.factory import make_backend
from serving_fakes import MODEL, LiveServer

LIMITS = Limits(max_input_tokens=60, max_total_tokens=128, max_batch_prefill_tokens=128)
# Two sequences, small pages, a 32-token budget: a long test prompt enters over several steps.
ENGINE_KW = dict(max_seqs=2, page_size=8, token_budget=32, decode_steps=4, adapter_slots=0)


def train_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """A 300-piece BPE sentencepiece model with byte fallback and Gemma's special ids and turn markers."""
    directory = Path(directory)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog",
                                 "hello world, a tiny tokenizer for the serving test"] * 50), encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(directory / "tok"), model_type="bpe", vocab_size=300,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, minloglevel=2)
    return Tokenizer.from_file(directory / "tok.model")


def tiny_model(tok: Tokenizer, seed: int = 7) -> tuple[GemmaConfig, dict]:
    """tiny_mqa (Gemma 1 layout, so a PEFT adapter's model_type is "gemma") over `tok`'s vocabulary,
    its turn markers and `LIMITS`; random params with every layer matrix scaled 8x."""
    config = tiny_mqa(tok.vocab_size).replace(
        start_of_turn_id=tok.start_of_turn_id, end_of_turn_id=tok.end_of_turn_id, limits=LIMITS)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "embedder" in jax.tree_util.keystr(path) or x.ndim < 2 else x * 8.0,
        init_params(config, jax.random.key(seed), jnp.float32))
    return config, params


def make_engine(config: GemmaConfig, params, **kw) -> PagedEngine:
    return build_engine(config, params, **{**ENGINE_KW, **kw})


@contextlib.contextmanager
def serve(engine: PagedEngine, tok: Tokenizer, data_dir: str | os.PathLike,
          **app_kw) -> Iterator[tuple[LiveServer, Backend]]:
    """The backend `gemma-jax serve` builds around `engine` (a new scheduler), started, behind a
    LiveServer; stopped (server, then scheduler) on exit."""
    backend = make_backend(engine, tok, model_name=MODEL)
    backend.start()
    try:
        server = LiveServer(create_app(backend, data_dir=data_dir, **{"stream_padding": False, **app_kw}))
        try:
            yield server, backend
        finally:
            server.close()
    finally:
        backend.stop()

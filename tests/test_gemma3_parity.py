"""The real Gemma 3 270M GGUF through our loader and model vs transformers' `Gemma3ForCausalLM`
loaded from the same file (`gguf_file=`), both in float32.

- full-prompt logits: rel-err (max |ours - ref| / max |ref|) <= 1e-4 on several prompts, one of
  ~600 tokens so the sliding-window (512) layers really cut keys off;
- greedy 32-token continuations identical token for token: ours step by step with the KV cache,
  transformers' `generate(do_sample=False)` (a raw and a chat-template prompt);
- our prefill-then-decode with the cache equals one full forward (past the sliding window too).

Both models are loaded once per module (transformers ~35 s, ours ~6 s on two idle cores). Prompts are padded at the end
to two lengths (64, 640) so that each jit-compiles once: with a causal mask, tokens after a
position cannot change its logits, and padded cache writes go to position S and are dropped.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_jax.model import forward, init_cache
from gemma_jax.tokenizer import Tokenizer, encode_chat
from gemma_jax.weights.gguf import load_gguf

BUCKETS = (64, 640)
CACHE_LEN = 704  # longest prompt (600) + 32 generated, rounded up
NEW_TOKENS = 32
LONG_TOKENS = 600


def _long_text() -> str:
    rng = np.random.default_rng(7)
    subjects = ["The river", "A small robot", "My grandmother", "The old library", "Every compiler",
                "The committee", "A quiet village", "The orchestra"]
    verbs = ["remembers", "rebuilt", "ignored", "translated", "painted", "measured", "carried", "forgot"]
    objects = ["the northern bridge", "seven letters", "a broken violin", "the morning tide",
               "forty-two lanterns", "the census of 1871", "an unfinished map", "the silver key"]
    sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} in {1800 + i * 3}."
                 for i in range(200)]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tokenizer(gguf_file):
    return Tokenizer.from_gguf(gguf_file)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    long_ids = tokenizer.encode(_long_text())[:LONG_TOKENS]
    assert len(long_ids) == LONG_TOKENS
    return {
        "raw": tokenizer.encode("The capital of France is"),
        "chat": encode_chat(tokenizer, [{"role": "user", "content": "Write a haiku about the sea."}]),
        "code": tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
        "unicode": tokenizer.encode("Übersetzung: 東京は日本の首都です。🚀 Café naïve — résumé"),
        "long": long_ids,
    }


@pytest.fixture(scope="module")
def ours(gguf_file):
    config, params = load_gguf(gguf_file, dtype=jnp.float32)
    return config, params


@pytest.fixture(scope="module")
def long_logits(ours, prompts):
    """Our full-forward logits of the ~600-token prompt (shared by two tests: ~10 s to compute)."""
    return _full_logits(ours, prompts["long"])


@pytest.fixture(scope="module")
def hf_model(gguf_file):
    import gguf
    from transformers import AutoModelForCausalLM

    # transformers opens the file with gguf.GGUFReader twice (config, then tensors), ~13 s each;
    # the second open reuses the first reader (read-only), nothing else changes.
    readers = {}
    reader_class = gguf.GGUFReader

    def shared_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared_reader)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    assert len(readers) == 1
    return model.eval()


def _bucket(n: int) -> int:
    return next(b for b in BUCKETS if b >= n)


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, tokens, positions, *, config):
    return forward(params, tokens, positions, None, config=config)[0]


@functools.partial(jax.jit, static_argnames="config")
def _with_cache(params, tokens, positions, cache, *, config):
    return forward(params, tokens, positions, cache, config=config)


def _full_logits(ours, ids) -> np.ndarray:
    """Our logits [T, V] for one prompt without a cache (padded to a bucket, then cut)."""
    config, params = ours
    t, bucket = len(ids), _bucket(len(ids))
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :t] = ids
    logits = _forward(params, jnp.asarray(tokens), jnp.arange(bucket, dtype=jnp.int32)[None], config=config)
    return np.asarray(logits[0, :t])


def _prefill(ours, ids, cache):
    """Write `ids` (positions 0..T-1) into `cache`; returns (logits [T, V], cache)."""
    config, params = ours
    t, bucket = len(ids), _bucket(len(ids))
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :t] = ids
    positions = np.full((1, bucket), CACHE_LEN, np.int32)  # padding writes land at S: dropped
    positions[0, :t] = np.arange(t)
    logits, cache = _with_cache(params, jnp.asarray(tokens), jnp.asarray(positions), cache, config=config)
    return np.asarray(logits[0, :t]), cache


def _step(ours, token: int, position: int, cache):
    config, params = ours
    logits, cache = _with_cache(params, jnp.full((1, 1), token, jnp.int32),
                                jnp.full((1, 1), position, jnp.int32), cache, config=config)
    return np.asarray(logits[0, 0]), cache


def _our_greedy(ours, ids, n: int) -> list[int]:
    """Prompt and continuation both go through the cache one token at a time (one compiled step
    function for every call; short prompts make this cheaper than compiling a prefill)."""
    config, _ = ours
    cache = init_cache(config, 1, CACHE_LEN)
    for position, token in enumerate(ids):
        logits, cache = _step(ours, token, position, cache)
    out = [int(np.argmax(logits))]
    while len(out) < n:
        logits, cache = _step(ours, out[-1], len(ids) + len(out) - 1, cache)
        out.append(int(np.argmax(logits)))
    return out


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_config_from_gguf_metadata(ours):
    config, _ = ours
    assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads) == (18, 640, 4, 1)
    assert (config.head_dim, config.hidden_dim, config.vocab_size) == (256, 2048, 262_144)
    assert config.layer_types.count("global") == 3
    assert [i for i, t in enumerate(config.layer_types) if t == "global"] == [5, 11, 17]
    assert (config.sliding_window, config.rope_base, config.local_rope_base) == (512, 1e6, 1e4)
    assert config.query_pre_attn_scalar == 256
    assert (config.start_of_turn_id, config.end_of_turn_id) == (105, 106)


@pytest.mark.parametrize("name", ["raw", "chat", "code", "unicode", "long"])
def test_logits_match_transformers(name, prompts, ours, hf_model, request):
    ids = prompts[name]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids], dtype=torch.long)).logits[0].numpy()
    got = request.getfixturevalue("long_logits") if name == "long" else _full_logits(ours, ids)
    err = _rel_err(got, ref)
    print(f"{name}: {len(ids)} tokens, logits rel-err {err:.2e}")
    assert err <= 1e-4, f"{name}: rel-err {err:.3e}"
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", ["raw", "chat"])
def test_greedy_continuation_matches_transformers(name, prompts, ours, hf_model):
    ids = prompts[name]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=NEW_TOKENS)
    ref = out[0, len(ids):].tolist()
    stops = hf_model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    assert len(ref) == NEW_TOKENS or ref[-1] in stops  # transformers stops early only at an eos
    got = _our_greedy(ours, ids, NEW_TOKENS)
    assert got[: len(ref)] == ref


def test_step_by_step_decode_equals_full_forward(prompts, ours, long_logits):
    """Prefill 592 tokens into the cache, decode the last 8 one at a time (positions past the
    512-token window), compare every step's logits with the one full forward of all 600."""
    config, _ = ours
    ids, full = prompts["long"], long_logits
    split = LONG_TOKENS - 8
    logits, cache = _prefill(ours, ids[:split], init_cache(config, 1, CACHE_LEN))
    assert _rel_err(logits, full[:split]) <= 1e-5
    for position in range(split, LONG_TOKENS):
        step, cache = _step(ours, ids[position], position, cache)
        err = _rel_err(step, full[position])
        assert err <= 1e-5, f"position {position}: rel-err {err:.3e}"

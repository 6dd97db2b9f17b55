"""Issue 9's proof without a GPU, in CI: the compiled decode of the 7B shape (2 layers, the real
256000 vocabulary, batch 32) has no `conditional`, no sort over the vocabulary, no [B, K, span, H]
copy of the KV cache and no block copied out of it, and its bytes per step are within 1.2x of
weights + live KV, in every sampling mode and with a LoRA bank. The analysis is `benchmarks/hlo.py`'s (its HLO reader is
`benchmarks/hlo_text.py`); the first tests check that reader on programs whose answer is known by
construction, so that "zero found" means something.
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import hlo  # noqa: E402
import hlo_text  # noqa: E402
from gemma_jax import config as config_lib  # noqa: E402
from gemma_jax import sampling  # noqa: E402

VOCAB = 256_000


def _module(fn, *shapes, donate=()) -> hlo_text.Module:
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return hlo_text.parse(jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text())


# -- the reader, on known programs -----------------------------------------------------------------
def test_reader_counts_a_conditional():
    def fn(x):
        return jax.lax.cond(jnp.any(x > 0), lambda x: jnp.sin(x), lambda x: jnp.cos(x), x)

    assert len(hlo_text.conditionals(_module(fn, ((8, 4), jnp.float32)))) == 1
    assert hlo_text.conditionals(_module(jnp.sin, ((8, 4), jnp.float32))) == []


def test_reader_flags_vocabulary_sorts_and_large_top_k():
    logits = ((4, VOCAB), jnp.float32)
    found = hlo_text.sorts(_module(lambda x: jnp.sort(x, axis=-1), logits), VOCAB)
    assert [(s.kind, s.sorted_dim, s.over_vocab) for s in found] == [("sort", VOCAB, True)]
    big = hlo_text.sorts(_module(lambda x: jax.lax.top_k(x, 50)[0], logits), VOCAB)
    assert [(s.kind, s.k, s.over_vocab) for s in big] == [("top-k", 50, True)]  # a full sort on a GPU
    small = hlo_text.sorts(_module(lambda x: jax.lax.top_k(x, 8)[0], logits), VOCAB)
    assert [(s.k, s.over_vocab) for s in small] == [(8, False)]  # XLA's GPU top-k kernel
    chunked = hlo_text.sorts(_module(lambda x: jnp.sort(x.reshape(4, 1000, 256), axis=-1), logits), VOCAB)
    assert [(s.sorted_dim, s.over_vocab) for s in chunked] == [(256, False)]


def test_reader_finds_a_cache_span_copy_not_an_in_place_update():
    b, k, s, h = 4, 2, 64, 8
    cache = ((b, k, s, h), jnp.float32)

    def sliced(c, q):  # attention over a materialised bucket: the slice is a copy
        return jnp.einsum("bkh,bksh->bks", q, c[:, :, :16] * 2.0)

    def updated(c, q):  # one position per row written in place (into the donated cache)
        return c.at[jnp.arange(b), :, 3].set(q)

    query = ((b, k, h), jnp.float32)
    copies = hlo_text.cache_copies(_module(sliced, cache, query), b, k, h, s)
    assert [c.arrays[0][1] for c in copies] == [(b, k, 16, h)]
    assert hlo_text.cache_copies(_module(updated, cache, query, donate=(0,)), b, k, h, s) == []
    # Not donated, XLA must copy the whole cache before updating it: that copy is found too.
    copies = hlo_text.cache_copies(_module(updated, cache, query), b, k, h, s)
    assert [(c.opcode, c.arrays[0][1]) for c in copies] == [("copy", (b, k, s, h))]


def test_traffic_model_counts_an_in_place_update_as_its_update():
    cache = ((32, 4, 512, 64), jnp.float32)

    def update(c, u):
        return c.at[jnp.arange(32), :, 7].set(u)

    mod = _module(update, cache, ((32, 4, 64), jnp.float32), donate=(0,))
    update_bytes = 32 * 4 * 64 * 4
    total = sum(t.total for t in hlo_text.traffic(mod))
    assert update_bytes <= total <= 3 * update_bytes + 1024  # read + write the update, indices; not 32 MiB


def test_reader_finds_a_weight_permuted_by_einsum_and_none_with_weight_einsum():
    """jnp.einsum contracts "BTNH,NHD->BTD" as (H, N): XLA permutes the [N, H, D] weight on every
    loop iteration. weight_einsum contracts in the weight's order: the matmul reads it in place."""
    from gemma_jax.contraction import weight_einsum

    n, h, d = 4, 256, 640
    x, w = ((8, 1, n, h), jnp.float32), ((n, h, d), jnp.float32)

    def looped(einsum):  # the output projection in a loop, as in the decode loop
        def fn(x, w):
            step = lambda i, y: y + einsum("BTNH,NHD->BTD", y, w).sum(-1)[..., None, None]
            return jax.lax.fori_loop(0, 3, step, x)
        return fn

    found = hlo_text.weight_copies(_module(looped(jnp.einsum), x, w), {n * h * d})
    assert [c.arrays[0][1] for c in found] in ([(n * h, d)], [(h, n, d)]), found
    assert hlo_text.weight_copies(_module(looped(weight_einsum), x, w), {n * h * d}) == []


# -- the engine's compiled decode ------------------------------------------------------------------
SETUP = hlo.Setup(config_lib.gemma_7b().replace(num_layers=2), jnp.dtype(jnp.float32), slots=32, max_len=2048,
                  steps=8, context=1024, prompt=1512)


@pytest.fixture(scope="module")
def decode_reports():
    assert SETUP.config.vocab_size == VOCAB
    # Every sampling mode on the base model, and the widest mode with a LoRA bank (8 adapters, rank 8).
    return hlo.decode_reports(SETUP, lora_ranks=(8,), adapters=8, lora_mode=sampling.MODES[-1],
                              short_contexts=(), log=lambda *_: None)


def test_every_variant_was_compiled(decode_reports):
    names = [r.name for r in decode_reports]
    assert len(names) == len(sampling.MODES) + 1 and any("LoRA" in n for n in names)


def test_decode_has_no_conditional(decode_reports):
    found = {r.name: r.conditionals for r in decode_reports if r.conditionals}
    assert found == {}, f"conditionals in the compiled decode: {found}"


def test_decode_has_no_sort_over_the_vocabulary(decode_reports):
    found = {r.name: [str(s) for s in r.vocab_sorts] for r in decode_reports if r.vocab_sorts}
    assert found == {}, f"sorts over the vocabulary in the compiled decode: {found}"


def test_decode_has_no_cache_span_copy(decode_reports):
    """No kv bucket or span is cut out of the cache: attention reads it block by block in a loop."""
    found = {r.name: r.span_copies for r in decode_reports if r.span_copies}
    assert found == {}, f"[B, K, span, H] cache copies in the compiled decode: {found}"


def test_decode_never_copies_or_permutes_a_weight(decode_reports):
    found = {r.name: r.weight_copies for r in decode_reports if r.weight_copies}
    assert found == {}, f"weights copied before their matmul in the compiled decode: {found}"


def test_decode_attention_is_a_device_bounded_block_loop(decode_reports):
    """One attention loop per layer whose trip count is computed on the device (no compile per
    context), in the "reduce" form at this shape (MHA, batch 32) on this CPU: each K and V block is
    read in place, none copied out."""
    assert hlo.products(SETUP) == "reduce"
    for r in decode_reports:
        assert r.dynamic_loops == 2, r.name  # 2 layers
        assert r.block_copies == [], (r.name, r.block_copies)


def test_decode_bytes_within_the_target_of_weights_and_live_kv(decode_reports):
    """Item 8's byte target on the compiled program: XLA's bytes accessed per decode step (adjusted as
    benchmarks/hlo.py documents) within 1.2x of every weight byte once + every live KV byte once."""
    ratios = {r.name: round(r.adj_bytes / r.ideal_bytes, 3) for r in decode_reports}
    assert all(x <= hlo.TARGET_RATIO for x in ratios.values()), ratios

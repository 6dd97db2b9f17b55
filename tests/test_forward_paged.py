"""`model.forward_paged` (a flat ragged batch over a paged KV cache) against `model.forward`.

Three sequences share one page pool under shuffled page tables (page size 4). Step 1 is a flat batch
of a chunk of A (6 tokens), all of B (7) and a chunk of C (3), plus padding; step 2 the rest of A and
C with one decode token of B. Every token's logits equal the plain full forward (no cache) over its
own sequence at that position, which `test_gemma3_parity` / `test_gemma_parity` hold equal to
transformers. tiny_gemma3 has sliding-window layers (window 4: chunks cross windows and pages) and
GQA; tiny_mha is Gemma 1's MHA. Also: logits_rows picks rows; per-token LoRA ids select adapters
(a bank with one random adapter vs merge_lora).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from engine_reference import prompts_for, tiny_params
from gemma_jax import model

PAGE, POOL, M = 4, 32, 4


def full_logits(config, params, ids):
    tokens = jnp.asarray([ids], jnp.int32)
    logits, _ = model.forward(params, tokens, jnp.arange(len(ids))[None], config=config)
    return np.asarray(logits[0])  # [T, V]


def flat_batch(pieces, tables, total: int):
    """pieces: (seq, start, ids) -> tokens, positions, PagedBatch padded to `total` tokens."""
    tokens, positions, seq_ids = [], [], []
    for seq, start, ids in pieces:
        tokens += ids
        positions += list(range(start, start + len(ids)))
        seq_ids += [seq] * len(ids)
    pad = total - len(tokens)
    pos = np.asarray(positions, np.int32)
    pages = np.asarray([tables[s][p // PAGE] for s, p in zip(seq_ids, pos)] + [0] * pad, np.int32)
    offsets = np.asarray(list(pos % PAGE) + [0] * pad, np.int32)
    batch = model.PagedBatch(pages=jnp.asarray(pages), offsets=jnp.asarray(offsets),
                             tables=jnp.asarray(tables, jnp.int32),
                             seq_ids=jnp.asarray(seq_ids + [0] * pad, jnp.int32))
    return (jnp.asarray(tokens + [0] * pad, jnp.int32), jnp.asarray(positions + [-1] * pad, jnp.int32), batch)


@pytest.mark.parametrize("name", ["tiny_gemma3", "tiny_mha"])
def test_a_flat_ragged_batch_equals_the_full_forward(name):
    config, params = tiny_params(name)
    a, b, c = prompts_for([11, 8, 5], seed=4)
    tables = np.random.default_rng(0).permutation(np.arange(1, POOL))[: 3 * M].reshape(3, M)
    cache = model.init_paged_cache(config, POOL, PAGE)
    step = jax.jit(lambda p, t, pos, cache, batch: model.forward_paged(p, t, pos, cache, batch, config=config))

    tokens, positions, batch = flat_batch([(0, 0, a[:6]), (1, 0, b[:7]), (2, 0, c[:3])], tables, 20)
    logits, cache = step(params, tokens, positions, cache, batch)
    logits = np.asarray(logits)
    want = [full_logits(config, params, s) for s in (a, b, c)]
    np.testing.assert_allclose(logits[:6], want[0][:6], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[6:13], want[1][:7], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[13:16], want[2][:3], rtol=1e-4, atol=1e-4)

    tokens, positions, batch = flat_batch([(2, 3, c[3:]), (1, 7, b[7:]), (0, 6, a[6:])], tables, 12)
    logits, cache = step(params, tokens, positions, cache, batch)
    logits = np.asarray(logits)
    np.testing.assert_allclose(logits[:2], want[2][3:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[2:3], want[1][7:], rtol=1e-4, atol=1e-4)  # B's decode token
    np.testing.assert_allclose(logits[3:8], want[0][6:], rtol=1e-4, atol=1e-4)
    untouched = np.setdiff1d(np.arange(1, POOL), tables)
    assert not np.asarray(cache["layer_0"].k)[untouched].any()  # only the tables' pages (and page 0) written


def test_logits_rows_and_per_token_adapters():
    from gemma_jax import lora as lora_lib
    from test_lora_engine import _adapter  # noqa: PLC0415 - a random adapter, as peft would write it

    config, params = tiny_params("tiny_mha")  # a Gemma 1 config: the helper's adapters say model_type gemma
    adapter = _adapter(config, rank=4, seed=1)
    bank = lora_lib.make_bank(config, 2, 4, jnp.float32, None)
    bank = lora_lib.bank_add(bank, 1, adapter)
    merged = lora_lib.merge_lora(params, adapter)
    a, b = prompts_for([6, 5], seed=9)
    tables = np.arange(1, 1 + 2 * M).reshape(2, M)
    tokens, positions, batch = flat_batch([(0, 0, a), (1, 0, b)], tables, 12)
    ids = jnp.asarray([1] * 6 + [0] * 6, jnp.int32)  # A with the adapter, B and padding without
    rows = jnp.asarray([5, 10], jnp.int32)  # each sequence's last token
    logits, _ = model.forward_paged(params, tokens, positions, model.init_paged_cache(config, POOL, PAGE), batch,
                                    config=config, lora=(bank, ids), logits_rows=rows)
    assert logits.shape == (2, config.vocab_size)
    np.testing.assert_allclose(np.asarray(logits[0]), full_logits(config, merged, a)[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[1]), full_logits(config, params, b)[-1], rtol=1e-4, atol=1e-4)

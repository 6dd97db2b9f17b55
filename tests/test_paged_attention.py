"""Ragged paged attention (gemma_jax/paged_attention.py) against numpy by hand.

A pool of pages holds several sequences' KV under shuffled page tables; a flat ragged batch mixes
decode tokens (one per sequence), prompt chunks (several consecutive positions of one sequence,
causal among themselves) and padding. The numpy reference rebuilds each sequence's KV in order
from its table and takes the masked softmax per token. MHA, GQA and MQA; sliding windows that cut
inside and across pages; a logit softcap; bfloat16 inputs; padding returns zeros. `write_pages` then
attention equals one dense causal pass over a whole prompt written in chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gemma_jax.paged_attention import ragged_paged_attention, write_pages

S = 4  # positions per page


def reference(q, k_pages, v_pages, tables, seq_ids, positions, window, scale, softcap):
    t, n, h = q.shape
    kv = k_pages.shape[1]
    out = np.zeros((t, n, h), np.float64)
    for i in range(t):
        if positions[i] < 0:
            continue
        table = tables[seq_ids[i]]
        ctx = positions[i] + 1
        k = np.concatenate([k_pages[p] for p in table], axis=1)[:, :ctx]  # [K, ctx, H]
        v = np.concatenate([v_pages[p] for p in table], axis=1)[:, :ctx]
        first = 0 if window is None else max(0, positions[i] - window + 1)
        for head in range(n):
            kh = head // (n // kv)
            logits = (k[kh] @ q[i, head].astype(np.float64)) * scale
            if softcap is not None:
                logits = np.tanh(logits / softcap) * softcap
            logits[:first] = -np.inf
            p = np.exp(logits - logits.max())
            out[i, head] = (p / p.sum()) @ v[kh]
    return out


def batch(rng, heads, kv_heads, h=8, pages=24, m=5):
    """A pool with 3 sequences, and a step: seq 0 decodes at 13, seq 1 a chunk 5..10, seq 2 decodes at 2,
    seq 1's chunk again for another token layout, padding."""
    k_pages = rng.normal(size=(pages, kv_heads, S, h)).astype(np.float32)
    v_pages = rng.normal(size=(pages, kv_heads, S, h)).astype(np.float32)
    order = rng.permutation(np.arange(1, pages))
    tables = order[: 3 * m].reshape(3, m).astype(np.int32)
    seq_ids = np.array([0, 1, 1, 1, 1, 1, 1, 2, 0, 0], np.int32)
    positions = np.array([13, 5, 6, 7, 8, 9, 10, 2, -1, -1], np.int32)  # the last two: padding
    q = rng.normal(size=(len(positions), heads, h)).astype(np.float32)
    return q, k_pages, v_pages, tables, seq_ids, positions


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (6, None), (None, 5.0)])
@pytest.mark.parametrize("products", ["dot", "reduce"])
def test_ragged_paged_attention_equals_numpy(heads, kv_heads, window, softcap, products):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    q, k_pages, v_pages, tables, seq_ids, positions = batch(rng, heads, kv_heads)
    scale = 8 ** -0.5
    got = jax.jit(ragged_paged_attention, static_argnames=("window", "scale", "softcap", "products"))(
        q, k_pages, v_pages, tables, seq_ids, positions, window=window, scale=scale, softcap=softcap,
        products=products)
    want = reference(q, k_pages, v_pages, tables, seq_ids, positions, window, scale, softcap)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    assert not np.asarray(got)[positions < 0].any()  # padding: zeros


def test_bfloat16_inputs():
    rng = np.random.default_rng(7)
    q, k_pages, v_pages, tables, seq_ids, positions = batch(rng, 4, 2)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    got = ragged_paged_attention(bf(q), bf(k_pages), bf(v_pages), tables, seq_ids, positions, scale=0.3)
    assert got.dtype == jnp.bfloat16
    f = lambda x: np.asarray(bf(x), np.float32)
    want = reference(f(q), f(k_pages), f(v_pages), tables, seq_ids, positions, None, 0.3, None)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_a_prompt_written_in_chunks_equals_one_causal_pass():
    """Write a 14-token prompt's K/V in chunks of 5, 5, 4 (attending after each write), with a
    shuffled page table; the outputs equal dense causal attention over the whole prompt."""
    rng = np.random.default_rng(3)
    heads, kv_heads, h, length = 4, 2, 8, 14
    q = rng.normal(size=(length, heads, h)).astype(np.float32)
    k = rng.normal(size=(length, kv_heads, h)).astype(np.float32)
    v = rng.normal(size=(length, kv_heads, h)).astype(np.float32)
    table = np.array([[7, 2, 9, 4]], np.int32)
    k_pages = jnp.zeros((10, kv_heads, S, h))
    v_pages = jnp.zeros((10, kv_heads, S, h))
    outs = []
    for start, end in ((0, 5), (5, 10), (10, 14)):
        pos = np.arange(start, end)
        k_pages, v_pages = write_pages(k_pages, v_pages, k[start:end], v[start:end], table[0, pos // S], pos % S)
        outs.append(ragged_paged_attention(q[start:end], k_pages, v_pages, table, np.zeros(end - start, np.int32),
                                           pos.astype(np.int32), scale=0.5))
    got = np.concatenate([np.asarray(o) for o in outs])
    logits = np.einsum("tkgh,skh->tkgs", q.reshape(length, kv_heads, 2, h), k) * 0.5
    logits = np.where(np.tril(np.ones((length, length), bool))[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("tkgs,skh->tkgh", p / p.sum(-1, keepdims=True), v).reshape(length, heads, h)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert not np.asarray(k_pages)[[0, 1, 3, 5, 6, 8]].any()  # only the table's pages were written

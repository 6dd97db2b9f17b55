"""Attention over a paged KV cache for a flat, ragged token batch: the XLA reference (issue 17).

    write_pages(k_pages [P, K, S, H], v_pages, k [T, K, H], v [T, K, H], pages [T], offsets [T])
        -> (k_pages, v_pages)            (also scale pools [P, K, S] with scales [T, K])
    ragged_paged_attention(q [T, N, H], k_pages [P, K, S, H], v_pages, tables [Q, M], seq_ids [T],
                           positions [T], *, window, scale, softcap, k_scale=None, v_scale=None)
        -> [T, N, H]
    paged_attention_fn(impl) -> the implementation: "xla" (this reference) or a kernel of
        `paged_kernels.py`

Shape letters: T tokens of the step (decode tokens and prompt chunks together, padded to a token
budget), P pages of the pool, S positions per page, K kv heads, N query heads (G = N // K per kv
head), H head dim, Q sequences of the step, M pages per page table.

A token's KV sits at position p of its sequence: page `tables[seq, p // S]`, offset `p % S`. The
host writes each step's KV slots (`write_pages`: page and offset per token; padding tokens write
to page 0, the trash page of `engine/pages.py`) and then every token t attends to its sequence's
positions [max(0, positions[t] - window + 1), positions[t]] (its own, just written, included), so
a prompt chunk is causal within itself and sees every earlier chunk and cached prefix page.

The reference reads the cache in place page by page: a `lax.fori_loop` over page columns 0 ..
(the batch's last needed page), each iteration gathering one page per token ([T, K, S, H]) and
folding it into an online softmax, so no [T, context] copy of the KV is made and nothing is
compiled per context length. Padding tokens (position < 0) attend nothing and return zeros.
An int8 pool comes with float32 scales [P, K, S] (`model.quantize_kv`: one per token and kv head);
the reference multiplies each gathered page by its scales, so it reads 1 byte per value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax.attention import _logits_reduce, _values_reduce

_NEG = -1e30  # masked logits (finite, so an all-masked block leaves the running max unchanged)


def write_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, pages: jax.Array,
                offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k/v [T, K, H] into their pools at (pages[t], offsets[t]); later tokens win a shared slot
    (only the trash page is ever shared). Scale pools [P, K, S] take scales [T, K] the same way."""
    k_pages = k_pages.at[pages, :, offsets].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[pages, :, offsets].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def paged_attention_fn(impl: str = "xla"):
    """The ragged paged attention of `impl`: "xla" is `ragged_paged_attention`; the Pallas kernels
    ("pallas_tpu", "pallas_gpu") live in `paged_kernels.py` with the same signature."""
    if impl == "xla":
        return ragged_paged_attention
    from gemma_jax import paged_kernels  # noqa: PLC0415 - Pallas imports only where a kernel is asked for

    return paged_kernels.paged_attention_fn(impl)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array,
                           seq_ids: jax.Array, positions: jax.Array, *, window: int | None = None,
                           scale: float, softcap: float | None = None, k_scale: jax.Array | None = None,
                           v_scale: jax.Array | None = None, products: str = "dot") -> jax.Array:
    """Each token's attention over its own sequence's pages (module docstring). Returns [T, N, H] in q's dtype.

    products: the form of each page column's two products, as in `attention.decode_attention`:
    "dot" (einsums), or "reduce" (sums of products; with `attention.compiler_options("reduce")`
    XLA:CPU fuses each gathered page into them instead of copying it out: `benchmarks/hlo.py`)."""
    tables, seq_ids, positions = (jnp.asarray(x, jnp.int32) for x in (tables, seq_ids, positions))
    t, n, h = q.shape
    _, kv, s, _ = k_pages.shape
    g = n // kv
    qg = (q.astype(jnp.float32) * scale).reshape(t, kv, g, h)  # [T, K, G, H]
    table = tables[jnp.clip(seq_ids, 0, tables.shape[0] - 1)]  # [T, M]
    live = positions >= 0
    first = jnp.zeros_like(positions) if window is None else jnp.maximum(positions - window + 1, 0)
    lo = jnp.min(jnp.where(live, first // s, tables.shape[1]))  # first page column any token needs
    hi = jnp.max(jnp.where(live, positions // s + 1, 0))  # one past the last

    def body(col, carry):
        m, l, acc = carry  # [T, K, G], [T, K, G], [T, K, G, H]
        page = table[:, col]  # [T]
        kb = k_pages[page].astype(jnp.float32)  # [T, K, S, H]
        vb = v_pages[page].astype(jnp.float32)
        if k_scale is not None:  # int8 pages: each value times its token's scale
            kb = kb * k_scale[page][..., None]
            vb = vb * v_scale[page][..., None]
        logits = _logits_reduce(qg, kb) if products == "reduce" else jnp.einsum("tkgh,tksh->tkgs", qg, kb)
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        pos = col * s + jnp.arange(s)  # [S] positions of this page column
        ok = (pos[None, :] <= positions[:, None]) & (pos[None, :] >= first[:, None]) & live[:, None]  # [T, S]
        logits = jnp.where(ok[:, None, None, :], logits, _NEG)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.where(ok[:, None, None, :], jnp.exp(logits - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        values = _values_reduce(p, vb) if products == "reduce" else jnp.einsum("tkgs,tksh->tkgh", p, vb)
        acc = acc * correction[..., None] + values
        return m_new, l, acc

    init = (jnp.full((t, kv, g), _NEG, jnp.float32), jnp.zeros((t, kv, g), jnp.float32),
            jnp.zeros((t, kv, g, h), jnp.float32))
    _, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
    return out.reshape(t, n, h).astype(q.dtype)
